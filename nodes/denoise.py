"""LynxSampler's ``denoise``: which part of the schedule runs when only part of the noise is added.

As ComfyUI's KSampler: for ``denoise`` d < 1 the schedule is built for more steps and only its
last ``steps`` + 1 sigmas are kept, so ``steps`` steps run from the sigma where a fraction d of
the noise remains; the start is ComfyUI's ``σ0·noise + (1 − σ0)·latent`` (video-to-video from an
encoded video latent). d = 1 is the whole schedule, exactly as without the input.
"""
from __future__ import annotations

import math

import torch

from lynx_core.sampling.schedule import flow_sigmas


def check_denoise(denoise) -> float:
    """``denoise`` as a float in (0, 1]; the error names the input and the fix."""
    try:
        d = float(denoise)
    except (TypeError, ValueError):
        raise ValueError(f"denoise: expected a number between 0 and 1 (got {denoise!r})") from None
    if not math.isfinite(d) or d < 0.0 or d > 1.0:
        raise ValueError(f"denoise: {denoise!r} is outside 0..1; use 1.0 for text-to-video, or e.g. 0.5 to keep "
                         "half of an encoded video latent (video-to-video)")
    if d == 0.0:
        raise ValueError("denoise: 0 would run no step and return latent_image unchanged; use a value above 0 "
                         "(1.0 = the whole schedule, 0.3-0.7 for video-to-video)")
    return d


def schedule_steps(steps: int, denoise: float) -> int:
    """Length of the official schedule whose tail is kept: round(steps / denoise).

    Rounded, not truncated: 7 / 0.14 is 49.999… in floating point, and int() would give 49, one step short."""
    return max(int(steps), int(round(int(steps) / float(denoise))))


def official_tail(steps: int, shift: float, denoise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The official float64 sigmas (``steps`` + 1, ending at 0) and int64 timesteps (``steps``) for ``denoise``."""
    total = schedule_steps(steps, denoise)
    sig64, timesteps = flow_sigmas(total, float(shift))
    if total == int(steps):
        return sig64, timesteps
    return sig64[-(int(steps) + 1):].clone(), timesteps[-int(steps):].clone()


def comfy_tail(full_sigmas, steps: int, denoise: float) -> torch.Tensor:
    """ComfyUI's KSampler.set_steps rule for its own schedulers: ``full_sigmas(n)`` for
    int(steps / denoise) steps, last steps + 1 kept; denoise above 0.9999 is the whole schedule."""
    if denoise > 0.9999:
        return full_sigmas(int(steps))
    return full_sigmas(int(int(steps) / denoise))[-(int(steps) + 1):]
