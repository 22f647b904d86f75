"""ComfyUI IMAGE tensors <-> uint8 RGB arrays (the one conversion every node shares)."""
from __future__ import annotations

import numpy as np
import torch

from lynx_core.video import check_finite_frames


def to_uint8(images: torch.Tensor, input_name: str = "image") -> np.ndarray:
    """ComfyUI IMAGE [N, H, W, C] float in [0, 1] -> uint8 RGB [N, H, W, 3] (grey is expanded).

    NaN/inf frames raise (naming ``input_name`` and the frames) instead of turning black in the cast.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{input_name}: expected a non-empty ComfyUI IMAGE batch [N, H, W, C] "
                         "(e.g. from Load Image or VAE Decode)")
    arr = images.detach().to("cpu", torch.float32)[..., :3]
    check_finite_frames(arr.numpy(), input_name)
    if arr.shape[-1] == 1:
        arr = arr.expand(-1, -1, -1, 3)
    return (arr.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)


def from_uint8(arr: np.ndarray) -> torch.Tensor:
    """uint8 RGB [N, H, W, 3] -> ComfyUI IMAGE float in [0, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).to(torch.float32) / 255.0
