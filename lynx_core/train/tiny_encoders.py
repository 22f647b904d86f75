"""Tiny deterministic stand-ins for the Wan VAE and UMT5, for tests and the tiny training demo.

They have the real encoders' interfaces and shapes, not their quality:

* :class:`TinyVAE`: RGB in [-1, 1], averaged over 8x8 pixels and (after the first frame, which Wan's
  causal VAE keeps alone) over groups of 4 frames, then a fixed random 3 -> 16 projection.
  ``F`` frames -> ``(F - 1) // 4 + 1`` latent frames, ``H x W`` -> ``H/8 x W/8``.
* :class:`TinyTextEncoder`: one fixed random vector per lower-cased word (seeded by a hash of the
  word), plus an end-of-text vector, so ``L`` = words + 1 like a trimmed UMT5 output (never empty).

Same inputs, same outputs, on every machine: the weights come from seeded generators.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TinyVAE", "TinyTextEncoder"]

_WORD = re.compile(r"\w+", re.UNICODE)


def _seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


class TinyVAE:
    """``encode_video(frames uint8 [F, H, W, 3]) -> Tensor [16, (F-1)//4+1, H/8, W/8]`` (float32)."""

    def __init__(self, seed: int = 0, channels: int = 16, spatial: int = 8, temporal: int = 4) -> None:
        self.seed, self.channels, self.spatial, self.temporal = seed, channels, spatial, temporal
        g = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(3, channels, generator=g) / 3 ** 0.5
        self.bias = 0.1 * torch.randn(channels, generator=g)

    @property
    def identifier(self) -> str:
        return f"tiny-vae(seed={self.seed},c={self.channels},s={self.spatial},t={self.temporal})"

    def __call__(self, frames: np.ndarray | Tensor) -> Tensor:
        x = frames if isinstance(frames, Tensor) else torch.from_numpy(np.array(frames))
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"TinyVAE expects frames [F, H, W, 3], got {tuple(x.shape)}.")
        f, h, w, _ = x.shape
        if h % self.spatial or w % self.spatial:
            raise ValueError(f"TinyVAE needs height and width divisible by {self.spatial}, got {h}x{w}.")
        x = x.float().div(127.5).sub(1.0).permute(0, 3, 1, 2)  # F,3,H,W
        x = F.avg_pool2d(x, self.spatial)  # F,3,h,w
        groups = [x[:1]]
        n_latent = (f - 1) // self.temporal + 1
        for i in range(1, n_latent):
            groups.append(x[1 + (i - 1) * self.temporal:1 + i * self.temporal].mean(0, keepdim=True))
        pooled = torch.cat(groups).permute(0, 2, 3, 1)  # F',h,w,3
        latent = pooled @ self.projection + self.bias  # F',h,w,C
        return latent.permute(3, 0, 1, 2).contiguous()


class TinyTextEncoder:
    """``encode_text(str) -> Tensor [words + 1, dim]`` (float32); the last row is the end-of-text vector."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        self.dim, self.seed = dim, seed

    @property
    def identifier(self) -> str:
        return f"tiny-text(seed={self.seed},dim={self.dim})"

    def _vector(self, token: str) -> Tensor:
        g = torch.Generator().manual_seed(_seed_of(f"{self.seed}\x00{token}"))
        return torch.randn(self.dim, generator=g)

    def __call__(self, text: str) -> Tensor:
        if not isinstance(text, str):
            raise TypeError(f"TinyTextEncoder expects a string, got {type(text).__name__}.")
        tokens = [t.lower() for t in _WORD.findall(text)] + ["</s>"]
        return torch.stack([self._vector(t) for t in tokens])
