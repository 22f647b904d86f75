"""Flow-matching targets, timestep sampling and condition dropout, drawn per sample.

Every random draw of a sample comes from its own CPU generator seeded by (run seed, step, global
sample position), never from global RNG state. So the draws do not depend on the device, on how
samples are spread over processes, or on where a run was resumed: the same seed gives the same
loss curve.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# What a sample is conditioned on in one step; the first three are the three inference passes.
FULL = "full"          # prompt + identity     (the "c" pass)
NO_TEXT = "no_text"    # negative + identity   (the "i" pass)
NO_ID = "no_id"        # prompt, no identity
NO_BOTH = "no_both"    # negative, no identity (the "u" pass)


def sample_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator for one (seed, step, position, ...) tuple; stable across runs and machines."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in (seed, *parts)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little"))


def shift_sigma(u: float, shift: float) -> float:
    """Wan's flow shift: sigma = s*u / (1 + (s-1)*u); more weight on high noise for s > 1."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def draw_sigma(gen: torch.Generator, scheme: str, shift: float = 3.0, logit_mean: float = 0.0,
               logit_std: float = 1.0) -> float:
    """One training sigma in (0, 1): 'shift' (uniform then Wan's shift), 'logit_normal', 'uniform'."""
    if scheme == "logit_normal":
        z = torch.randn((), generator=gen).item() * logit_std + logit_mean
        sigma = 1.0 / (1.0 + math.exp(-z))
    else:
        u = torch.rand((), generator=gen).item()
        sigma = shift_sigma(u, shift) if scheme == "shift" else u
    # Keep away from exact 0/1, where the velocity target degenerates.
    return min(max(sigma, 1e-4), 1.0 - 1e-4)


def draw_condition(gen: torch.Generator, drop_id: float, drop_text: float, drop_both: float) -> str:
    u = torch.rand((), generator=gen).item()
    if u < drop_both:
        return NO_BOTH
    if u < drop_both + drop_id:
        return NO_ID
    if u < drop_both + drop_id + drop_text:
        return NO_TEXT
    return FULL


@dataclass
class NoisedTarget:
    x_t: Tensor        # the model input, [16, F, h, w] float32
    target: Tensor     # the velocity v = eps - x0, float32
    sigma: float
    timestep: Tensor   # 0-dim float32, sigma * 1000


def noise_sample(x0: Tensor, sigma: float, gen: torch.Generator) -> NoisedTarget:
    """x_t = (1 - sigma) x0 + sigma eps; the model learns v = eps - x0 (Wan's flow matching)."""
    x0 = x0.float()
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    x_t = (1.0 - sigma) * x0 + sigma * eps
    return NoisedTarget(x_t=x_t, target=eps - x0, sigma=sigma,
                        timestep=torch.tensor(sigma * 1000.0, dtype=torch.float32))


def flow_loss(predictions: list[Tensor], targets: list[Tensor]) -> tuple[Tensor, list[float]]:
    """Mean squared error per sample, then the mean over samples (a long video weighs like an image)."""
    per_sample = [torch.mean((p.float() - t.to(p.device).float()) ** 2) for p, t in zip(predictions, targets)]
    loss = torch.stack(per_sample).mean()
    return loss, [float(x.detach()) for x in per_sample]
