"""Samplers for flow-matching velocity models (Wan2.1): UniPC (the official one) and Euler.

Conventions shared by every sampler here:

* ``model_fn(x, sigma, timestep, step_index) -> v``: x is the fp32 latent, sigma a Python float,
  timestep an int64 tensor of shape [1] (the value the model's time embedding receives) and v the
  velocity, same shape as x. The flow is x_σ = (1 − σ)·x0 + σ·ε, v = ε − x0, so x0 = x − σ·v.
* ``sigmas`` has one more entry than ``timesteps``, strictly decreasing, ≥ 0; the last may be 0.
* Latents are fp32 throughout, whatever dtype the model returns.
* ``callback(step_index, total, x, x0_pred)`` is called after every step with the new latent and
  the clean-latent estimate of that step (for previews and progress).
* ``cancel()`` is polled before every model call; when it returns True the sampler raises
  :class:`Interrupted`. The caller's ``x`` is never modified in place, so an interrupted run
  leaves nothing half-written.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "Interrupted",
    "ModelFn",
    "StepCallback",
    "sample_unipc",
    "sample_euler",
    "SAMPLERS",
    "get_sampler",
]


class Interrupted(RuntimeError):
    """Raised between steps when the caller's ``cancel()`` returns True."""


class ModelFn(Protocol):
    def __call__(self, x: Tensor, sigma: float, timestep: Tensor, step_index: int) -> Tensor: ...


StepCallback = Callable[[int, int, Tensor, Tensor], None]
CancelFn = Callable[[], bool]

# Below this distance from σ = 1 the log-SNR λ = log((1 − σ)/σ) is −∞ and the multistep
# coefficients become inf/inf. Newer diffusers releases nudge σ = 1 by the same amount.
_SIGMA_ONE_EPS = 1e-6


def _check_schedule(x: Tensor, sigmas: Tensor, timesteps: Tensor) -> tuple[list[float], Tensor]:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor latent (got {type(x).__name__}).")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point latent (got dtype {x.dtype}).")
    sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    ts = torch.as_tensor(timesteps).detach().to("cpu").flatten()
    if sig.numel() < 2:
        raise ValueError("sigmas needs at least 2 entries (start and end); build it with flow_sigmas(steps).")
    if ts.numel() != sig.numel() - 1:
        raise ValueError(
            f"timesteps must have one entry fewer than sigmas (got {ts.numel()} timesteps for "
            f"{sig.numel()} sigmas); use the pair returned by flow_sigmas(steps)."
        )
    if not torch.isfinite(sig).all() or (sig < 0).any() or sig[0] > 1:
        raise ValueError(f"sigmas must be finite and within [0, 1] (got {sig.tolist()}).")
    if not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing (got {sig.tolist()}).")
    return sig.tolist(), ts.to(torch.int64)


def _poll(cancel: Optional[CancelFn], step_index: int, total: int) -> None:
    if cancel is not None and cancel():
        logger.info("sampling interrupted before step %d/%d", step_index + 1, total)
        raise Interrupted(f"Sampling was cancelled before step {step_index + 1} of {total}.")


def _velocity(model_fn: ModelFn, x: Tensor, sigma: float, timestep: Tensor, k: int) -> Tensor:
    v = model_fn(x, sigma, timestep, k)
    if not isinstance(v, Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"model_fn must return a velocity of shape {tuple(x.shape)} (got {got}) at step {k}.")
    return v.to(torch.float32)


# --------------------------------------------------------------------------------------------
# Euler
# --------------------------------------------------------------------------------------------

def sample_euler(
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    timesteps: Tensor,
    callback: Optional[StepCallback] = None,
    cancel: Optional[CancelFn] = None,
) -> Tensor:
    """First-order Euler on the flow ODE: ``x ← x + (σ_next − σ)·v``."""
    sig, ts = _check_schedule(x, sigmas, timesteps)
    total = len(ts)
    x = x.to(torch.float32)
    for k in range(total):
        _poll(cancel, k, total)
        s, s_next = sig[k], sig[k + 1]
        v = _velocity(model_fn, x, s, ts[k : k + 1].to(x.device), k)
        x0 = x - s * v
        x = x + (s_next - s) * v
        if callback is not None:
            callback(k, total, x, x0)
    return x


# --------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), B2(h) variant,
# data prediction, multistep order ≤ 2.
#
# In log-SNR time λ = log(α/σ) (α = 1 − σ for flows) the exact solution from s to t is
#   x_t = (σ_t/σ_s)·x_s + σ_t ∫ e^{λ} x0(λ) dλ .
# Expanding x0 around the current point gives the base update
#   x_t ≈ (σ_t/σ_s)·x_s − α_t·φ·x0_s,  φ = e^{−h} − 1,  h = λ_t − λ_s,
# plus B(h)-weighted finite-difference terms built from earlier (predictor, UniP) or the newly
# evaluated (corrector, UniC) x0 estimates. The corrector re-uses the model evaluation the next
# step needs anyway, so it costs nothing extra.
# --------------------------------------------------------------------------------------------

def _lam(sigma: float) -> float:
    sigma = min(sigma, 1.0 - _SIGMA_ONE_EPS)
    return math.log1p(-sigma) - math.log(sigma)


def _bh2_weights(h: float) -> tuple[float, float, float]:
    """φ = e^{−h}−1, and the B2(h)-normalised weights b1, b2 of the order conditions."""
    hh = -h
    phi = math.expm1(hh)
    b_h = phi  # the "bh2" choice B(h) = e^{−h} − 1
    g1 = phi / hh - 1.0  # h·φ₂-type term
    g2 = g1 / hh - 0.5  # h·φ₃-type term
    return phi, g1 / b_h, 2.0 * g2 / b_h


def _unipc_predict(
    x: Tensor, m0: Tensor, m_prev: Optional[Tensor], s: float, s_next: float, s_prev: Optional[float]
) -> Tensor:
    """UniP from σ=s to σ=s_next using x0 estimates m0 (at s) and optionally m_prev (at s_prev)."""
    if s_next == 0.0:
        # α=1, σ_next/σ=0, φ=−1: the first-order update lands exactly on the x0 estimate.
        return m0.clone()
    a_next = 1.0 - s_next
    lam_s, lam_t = _lam(s), _lam(s_next)
    h = lam_t - lam_s
    phi, _, _ = _bh2_weights(h)
    out = (s_next / s) * x - (a_next * phi) * m0
    if m_prev is not None:
        r = (_lam(s_prev) - lam_s) / h
        d1 = (m_prev - m0) / r
        # For order 2 the paper's B2 predictor uses the fixed weight ρ = 1/2.
        out = out - (a_next * phi * 0.5) * d1
    return out


def _unipc_correct(
    x: Tensor,
    m0: Tensor,
    m_prev: Optional[Tensor],
    m_new: Tensor,
    s: float,
    s_next: float,
    s_prev: Optional[float],
) -> Tensor:
    """UniC: redo the step s→s_next from x, now also using m_new = x0 evaluated at s_next."""
    a_next = 1.0 - s_next
    lam_s, lam_t = _lam(s), _lam(s_next)
    h = lam_t - lam_s
    phi, b1, b2 = _bh2_weights(h)
    out = (s_next / s) * x - (a_next * phi) * m0
    d_new = m_new - m0
    if m_prev is None:
        return out - (a_next * phi * 0.5) * d_new
    # Order conditions with nodes r (the older point) and 1 (the new point):
    #   ρ_r + ρ_1 = b1,   r·ρ_r + ρ_1 = b2.
    r = (_lam(s_prev) - lam_s) / h
    rho_r = (b1 - b2) / (1.0 - r)
    rho_1 = b1 - rho_r
    d1 = (m_prev - m0) / r
    return out - (a_next * phi) * (rho_r * d1 + rho_1 * d_new)


def sample_unipc(
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    timesteps: Tensor,
    callback: Optional[StepCallback] = None,
    cancel: Optional[CancelFn] = None,
) -> Tensor:
    """UniPC multistep (bh2, order 2, data prediction), as the official Lynx run uses it.

    Step k: evaluate the model at x_k; if k ≥ 1, correct x_k with UniC using that evaluation
    (the corrector has the order the previous predictor used); then predict x_{k+1} with UniP of
    order min(2, k + 1, steps − k): order 1 on the first step (no history) and on the last
    (lower_order_final). A step that ends at σ = 0 returns the x0 estimate itself.
    Matches diffusers' UniPCMultistepScheduler with flow sigmas to ~1e-6 (see tests).
    """
    sig, ts = _check_schedule(x, sigmas, timesteps)
    total = len(ts)
    x = x.to(torch.float32)
    # History of the previous step: the x it started from (pre-prediction), its x0 estimate,
    # the x0 estimate before that, and the order it used.
    x_last: Optional[Tensor] = None
    hist: list[Tensor] = []  # x0 estimates, most recent last, at sig[k-len(hist) .. k-1]
    last_order = 0
    for k in range(total):
        _poll(cancel, k, total)
        s = sig[k]
        v = _velocity(model_fn, x, s, ts[k : k + 1].to(x.device), k)
        m_new = x - s * v
        if k > 0 and x_last is not None:
            m0 = hist[-1]
            m_prev = hist[-2] if last_order >= 2 else None
            s_prev = sig[k - 2] if last_order >= 2 else None
            x = _unipc_correct(x_last, m0, m_prev, m_new, sig[k - 1], s, s_prev)
        hist = (hist + [m_new])[-2:]
        order = min(2, k + 1, total - k)
        if sig[k + 1] == 0.0:
            order = 1
        x_last = x
        m_prev = hist[-2] if order >= 2 else None
        s_prev = sig[k - 1] if order >= 2 else None
        x = _unipc_predict(x, m_new, m_prev, s, sig[k + 1], s_prev)
        last_order = order
        if callback is not None:
            callback(k, total, x, m_new)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"unipc": sample_unipc, "euler": sample_euler}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Look a sampler up by name (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}.")
    return SAMPLERS[key]
