"""Real text encoding and VAE for the standalone path, through diffusers/transformers when installed.

Paths point at the sub-folders of a ``Wan2.1-T2V-14B-Diffusers`` download (``vae/``, ``text_encoder/``,
``tokenizer/``). Numerics follow the official pipeline: UMT5 in bf16, text zero-padded to 512 tokens,
the reference latent a posterior *sample* with noise from seed+1, normalisation (z - mean) / std.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import torch

from ..seeds import reference_noise

WAN21_LATENT_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENT_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def _need(pkg: str):
    try:
        return __import__(pkg)
    except ImportError:
        raise ImportError(f"this option needs the optional package '{pkg}': pip install {pkg}") from None


def _stats(device, dtype):
    mean = torch.tensor(WAN21_LATENT_MEAN, device=device, dtype=dtype).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD, device=device, dtype=dtype).view(1, 16, 1, 1, 1)
    return mean, std


def clean_prompt(text: str) -> str:
    """html-unescape twice and collapse whitespace (ftfy is applied when installed)."""
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    def __init__(self, folder: str | Path, device="cpu", dtype=torch.bfloat16, max_length: int = 512):
        transformers = _need("transformers")
        folder = Path(folder)
        tok_dir = folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() else folder
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
        self.model = transformers.UMT5EncoderModel.from_pretrained(str(folder), torch_dtype=dtype).to(device).eval()
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, prompt: str, clean: bool = True) -> torch.Tensor:
        """[1, 512, 4096]: hidden states up to the true length, zero-padded (all positions attended)."""
        text = clean_prompt(prompt) if clean else prompt
        t = self.tokenizer([text], padding="max_length", max_length=self.max_length, truncation=True,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        dev = self.model.device
        hidden = self.model(t.input_ids.to(dev), t.attention_mask.to(dev)).last_hidden_state
        n = int(t.attention_mask.sum())
        out = torch.zeros_like(hidden)
        out[:, :n] = hidden[:, :n]
        return out


class WanVAE:
    def __init__(self, folder: str | Path, device="cpu", dtype=torch.bfloat16):
        diffusers = _need("diffusers")
        self.vae = diffusers.AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype).to(device).eval()
        self.dtype = dtype

    @torch.no_grad()
    def encode_reference(self, crop256: np.ndarray, seed: int, grey: bool = False) -> torch.Tensor:
        """Normalised latent [1,16,1,32,32] of the aligned face (or the mid-grey 'no reference')."""
        dev = self.vae.device
        x = torch.from_numpy(crop256).float().div(255).mul(2).sub(1).permute(2, 0, 1)[None, :, None]
        if grey:
            x = x * 0
        dist = self.vae.encode(x.to(dev, self.dtype)).latent_dist
        noise = reference_noise(seed, tuple(dist.mean.shape)).to(dev)
        z = dist.mean + dist.std * noise
        mean, std = _stats(dev, z.dtype)
        return (z - mean) * (1.0 / std)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 frames [F,H,W,3] (denormalise and clamp in the VAE dtype, as official)."""
        dev = self.vae.device
        z = latents.to(dev, self.dtype)
        mean, std = _stats(dev, z.dtype)
        video = self.vae.decode(z / (1.0 / std) + mean).sample  # [1,3,F,H,W]
        video = (video * 0.5 + 0.5).clamp(0, 1).float()
        return (video[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()


def encode_frames(vae: "WanVAE", frames: np.ndarray) -> torch.Tensor:
    """Training targets: uint8 frames [F,H,W,3] -> normalised latent [16, (F-1)//4+1, H/8, W/8].

    The posterior mean (not a sample): a training target should not carry the VAE's own noise.
    """
    dev = vae.vae.device
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).mul(2).sub(1)
    x = x.permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    with torch.no_grad():
        z = vae.vae.encode(x.to(dev, vae.dtype)).latent_dist.mean
    mean, std = _stats(dev, z.dtype)
    return ((z - mean) * (1.0 / std))[0].float().cpu()


def encode_text_trimmed(te: "TextEncoder", prompt: str) -> torch.Tensor:
    """[L, 4096] UMT5 states of the prompt's real tokens (the zero padding is added back at training)."""
    text = clean_prompt(prompt)
    t = te.tokenizer([text], max_length=te.max_length, truncation=True, add_special_tokens=True,
                     return_tensors="pt")
    dev = te.model.device
    with torch.no_grad():
        hidden = te.model(t.input_ids.to(dev), t.attention_mask.to(dev)).last_hidden_state
    return hidden[0].float().cpu()
