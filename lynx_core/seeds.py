"""Random draws of the official run, reproduced exactly (spec §7.4).

Both come from a fresh CPU ``torch.Generator`` (so the numbers do not depend on the GPU) and are
the same values diffusers' ``randn_tensor`` produces on CPU for a single generator:

* initial latent noise: seed, float32
* reference-image VAE posterior noise: seed + 1, bfloat16 (the cond and the grey uncond
  reference use the same draw)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = ["initial_noise", "reference_noise", "MAX_SEED"]

# torch.Generator.manual_seed accepts unsigned 64-bit values; ComfyUI's seed widget uses the
# same range.
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF

DeviceLike = Union[str, torch.device, None]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            if int(seed) == seed:
                seed = int(seed)
            else:
                raise ValueError
        except (TypeError, ValueError):
            raise TypeError(f"seed must be an integer (got {seed!r}).") from None
    if seed < 0:
        raise ValueError(
            f"seed must be ≥ 0 (got {seed}); Lynx always seeds its noise, pick any value in [0, 2^64−1]."
        )
    if seed > MAX_SEED:
        raise ValueError(f"seed must be ≤ 2^64−1 = {MAX_SEED} (got {seed}).")
    return seed


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (got {shape!r}).") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must not have negative sizes (got {dims}).")
    return dims


def _randn(seed: int, shape: Sequence[int], dtype: torch.dtype, device: DeviceLike) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.randn(_check_shape(shape), generator=g, dtype=dtype, device="cpu")
    return out if device is None else out.to(device)


def initial_noise(seed: int, shape: Sequence[int], device: DeviceLike = None) -> Tensor:
    """Initial latent noise: float32 N(0,1) from a CPU generator seeded with ``seed``.

    ``device``: where to put the result (the draw itself always happens on the CPU).
    """
    return _randn(_check_seed(seed), shape, torch.float32, device)


def reference_noise(seed: int, shape: Sequence[int], device: DeviceLike = None) -> Tensor:
    """Noise for the reference VAE posterior sample: bfloat16, CPU generator seeded ``seed + 1``.

    ``seed`` is the user's seed (the +1 happens here). seed = 2^64−1 wraps to 0 instead of
    overflowing the generator.
    """
    seed = _check_seed(seed)
    return _randn((seed + 1) & MAX_SEED, shape, torch.bfloat16, device)
