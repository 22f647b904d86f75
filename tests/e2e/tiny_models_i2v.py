"""Tiny random Wan image-to-video checkpoints that ComfyUI's model detection loads as I2V models.

ComfyUI's ``model_detection`` reads a Wan DiT from ``head.modulation``; ``in_dim`` is the
patch embedding's input channels and the model type is ``i2v`` when ``img_emb.proj.0.bias`` exists:

* Wan2.1-I2V: 36 input channels (16 noise + 4 mask + 16 image latent), the CLIP image embedder
  ``img_emb.proj.{0,1,3,4}`` (LayerNorm 1280, Linear 1280→1280, GELU, Linear 1280→dim, LayerNorm)
  and per block ``cross_attn.k_img / v_img / norm_k_img`` → ``WAN21_I2V`` (``WAN21``, image_to_video).
* Wan2.2-I2V-A14B expert: 36 input channels and nothing else → ``WAN21_T2V`` config, whose
  ``concat_cond`` still feeds mask + image latent. Two files (high- and low-noise expert).
* A 5B-shaped model (48 latent channels in and out, another width) → ``WAN22_T2V``: the adapters
  cannot fit it and Lynx must refuse it.

Widths/depths of the I2V files equal the session fixture's T2V DiT, so its tiny adapters fit them.
``python tiny_models_i2v.py MODELS_DIR`` writes the files and prints their names as JSON; the I2V e2e
test calls :func:`build_i2v_models` itself. Nothing is downloaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tiny_models import DIT_BLOCKS, DIT_DIM

I2V21_NAME = "lynx_tiny_wan21_i2v.safetensors"
I2V22_HIGH_NAME = "lynx_tiny_wan22_i2v_high_noise.safetensors"
I2V22_LOW_NAME = "lynx_tiny_wan22_i2v_low_noise.safetensors"
OTHER_WIDTH_NAME = "lynx_tiny_wan_5b_shaped.safetensors"
PREFIX = "model.diffusion_model."
CLIP_DIM = 1280
OTHER_WIDTH = 384


def _state(seed: int, dim: int, in_dim: int, out_dim: int = 16) -> dict[str, torch.Tensor]:
    from lynx_core.wan.config import WanConfig
    from lynx_core.wan.model import WanModel

    torch.manual_seed(seed)
    cfg = WanConfig(dim=dim, ffn_dim=512, num_heads=dim // 128, num_layers=DIT_BLOCKS, in_dim=in_dim, out_dim=out_dim)
    return {PREFIX + k: v.detach().clone().contiguous() for k, v in WanModel(cfg).state_dict().items()}


def _add_image_embedder(state: dict[str, torch.Tensor], dim: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def rand(shape, fan_in):
        return (torch.randn(shape, generator=g) / fan_in ** 0.5).contiguous()

    for i, width in ((0, CLIP_DIM), (4, dim)):  # the two LayerNorms
        state[f"{PREFIX}img_emb.proj.{i}.weight"] = torch.ones(width)
        state[f"{PREFIX}img_emb.proj.{i}.bias"] = torch.zeros(width)
    for i, (out, inp) in ((1, (CLIP_DIM, CLIP_DIM)), (3, (dim, CLIP_DIM))):
        state[f"{PREFIX}img_emb.proj.{i}.weight"] = rand((out, inp), inp)
        state[f"{PREFIX}img_emb.proj.{i}.bias"] = torch.zeros(out)
    for b in range(DIT_BLOCKS):
        ca = f"{PREFIX}blocks.{b}.cross_attn."
        for name in ("k_img", "v_img"):
            state[ca + name + ".weight"] = rand((dim, dim), dim)
            state[ca + name + ".bias"] = rand((dim,), dim)
        state[ca + "norm_k_img.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)


def build_i2v_models(models_dir: Path) -> dict[str, str]:
    """Write the I2V DiTs (and the 5B-shaped one) to ``models_dir/diffusion_models``."""
    from safetensors.torch import save_file

    out = Path(models_dir) / "diffusion_models"
    out.mkdir(parents=True, exist_ok=True)
    wan21 = _state(20, DIT_DIM, 36)
    _add_image_embedder(wan21, DIT_DIM, 21)
    files = {
        "i2v21": (I2V21_NAME, wan21),
        "i2v22_high": (I2V22_HIGH_NAME, _state(22, DIT_DIM, 36)),
        "i2v22_low": (I2V22_LOW_NAME, _state(23, DIT_DIM, 36)),
        "other_width": (OTHER_WIDTH_NAME, _state(24, OTHER_WIDTH, 48, out_dim=48)),
    }
    for name, state in files.values():
        path = out / name
        if not path.exists():
            save_file(state, str(path))
    return {key: name for key, (name, _) in files.items()}


if __name__ == "__main__":
    print(json.dumps(build_i2v_models(Path(sys.argv[1]))))
