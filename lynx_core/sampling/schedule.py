"""The flow-matching noise schedule that the official Lynx run uses (spec §7.1).

Wan2.1 is trained as a rectified flow: x_σ = (1 − σ)·x0 + σ·ε, and the model predicts the
velocity ε − x0. The official pipeline takes its sigma list from diffusers 0.33.1's
UniPC scheduler with `use_flow_sigmas=True`; this module rebuilds that list in float64.
"""
from __future__ import annotations

import logging
from typing import overload

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["flow_sigmas", "shift_sigma"]


@overload
def shift_sigma(sigma: float, shift: float) -> float: ...
@overload
def shift_sigma(sigma: Tensor, shift: float) -> Tensor: ...


def shift_sigma(sigma, shift):
    """Time shift of a flow sigma: ``shift·σ / (1 + (shift − 1)·σ)``.

    A shift above 1 moves the steps towards high noise; it maps 0→0 and 1→1.
    Works on Python floats and tensors alike.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (got {shift}); Wan2.1 480p uses 3.0, 720p uses 5.0.")
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(
    steps: int, shift: float = 3.0, num_train_timesteps: int = 1000
) -> tuple[Tensor, Tensor]:
    """Sigmas and model timesteps for ``steps`` denoising steps.

    Returns ``(sigmas, timesteps)``: sigmas is float64 with ``steps + 1`` entries, descending,
    ending with exactly 0; timesteps is int64 with ``steps`` entries, ``int(σ·T)`` truncated
    (not rounded), which is what the model's time embedding receives.

    Order of operations follows diffusers 0.33.1 (the version the official code pins):
    σ_raw = 1 − linspace(1, 1/T, steps+1) reversed with its last entry (0) dropped, so the first
    raw sigma is 1 − 1/T rather than 1. (Newer diffusers releases changed this list; we keep the
    pinned behaviour.) For 50 steps and shift 3 the timesteps are 999, 992, 985, …, 111, 57.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer (got {steps!r}).")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(
            f"num_train_timesteps must be an integer ≥ 2 (got {num_train_timesteps!r}); Wan uses 1000."
        )
    shift = float(shift)
    t_max = float(num_train_timesteps)
    # numpy's linspace, not torch's: the two place the interior points differently in the last
    # bits, and the official list is numpy's. The elementwise ops then give identical float64s.
    raw = 1.0 - np.linspace(1.0, 1.0 / t_max, steps + 1, dtype=np.float64)
    shifted = shift_sigma(raw, shift)[::-1][:-1].copy()
    sigmas = torch.from_numpy(shifted)
    # Truncation toward zero is the official behaviour (astype(int64)); σ > 0 so trunc == floor.
    timesteps = (sigmas * t_max).to(torch.int64)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    logger.debug("flow_sigmas(steps=%d, shift=%g): t=%s", steps, shift, timesteps.tolist())
    return sigmas, timesteps
