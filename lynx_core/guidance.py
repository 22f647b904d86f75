"""Classifier-free guidance for Lynx and the step window in which the adapters are active.

Passes (spec §7.2):

* ``u``: negative text, no identity (ID tokens from a zero embedding, Ref features of a grey image)
* ``i``: negative text **with** identity (the cond adapter inputs)
* ``c``: prompt with identity

Modes, chosen by :func:`guidance_mode` from (cfg, cfg_id):

=============  ======================  ===========================================
mode           when                    velocity
=============  ======================  ===========================================
``none``       cfg ≤ 1                 ``c`` (one pass; cfg_id is ignored)
``two_pass``   cfg > 1 and cfg_id ≤ 1  ``u + cfg·(c − u)``
``three_pass`` cfg > 1 and cfg_id > 1  ``u + cfg_id·(i − u) + cfg·(c − i)``
=============  ======================  ===========================================

The official code evaluates the three-pass formula in bf16 in exactly that operation order; the
combine functions therefore compute in the inputs' dtype, one rounding per operation.
"""
from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

__all__ = [
    "GuidanceMode",
    "guidance_mode",
    "combine_three_pass",
    "combine_two_pass",
    "adapter_window_active",
    "adapter_window_active_sigma",
    "validate_window",
]

GuidanceMode = Literal["three_pass", "two_pass", "none"]


def _scale(name: str, value: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number (got {value!r}).") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number (got {value!r}).")
    return f


def _same(*named: tuple[str, Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(
                f"guidance inputs must share shape and dtype: {first_name} is {tuple(first.shape)} "
                f"{first.dtype}, {name} is {tuple(t.shape)} {t.dtype}."
            )


def guidance_mode(cfg: float, cfg_id: float) -> GuidanceMode:
    """Which passes a step needs; see the module table. Pure function of the two scales."""
    cfg, cfg_id = _scale("cfg", cfg), _scale("cfg_id", cfg_id)
    if cfg <= 1.0:
        return "none"
    if cfg_id > 1.0:
        return "three_pass"
    return "two_pass"


def combine_three_pass(u: Tensor, i: Tensor, c: Tensor, cfg: float, cfg_id: float) -> Tensor:
    """``u + cfg_id·(i − u) + cfg·(c − i)`` in the inputs' dtype, in exactly this order.

    Algebraically ``(1 − cfg_id)·u + (cfg_id − cfg)·i + cfg·c``, but in bf16 the rounding
    differs, and this order is the official one.
    """
    _same(("u", u), ("i", i), ("c", c))
    cfg, cfg_id = _scale("cfg", cfg), _scale("cfg_id", cfg_id)
    return u + cfg_id * (i - u) + cfg * (c - i)


def combine_two_pass(u: Tensor, c: Tensor, cfg: float) -> Tensor:
    """Standard CFG ``u + cfg·(c − u)`` in the inputs' dtype."""
    _same(("u", u), ("c", c))
    cfg = _scale("cfg", cfg)
    return u + cfg * (c - u)


def validate_window(start_percent: float, end_percent: float) -> tuple[float, float]:
    """Check an adapter window: both in [0, 1] and start ≤ end. Returns them as floats."""
    s, e = _scale("start_percent", start_percent), _scale("end_percent", end_percent)
    if not (0.0 <= s <= 1.0):
        raise ValueError(f"start_percent must be between 0 and 1 (got {start_percent}).")
    if not (0.0 <= e <= 1.0):
        raise ValueError(f"end_percent must be between 0 and 1 (got {end_percent}).")
    if s > e:
        raise ValueError(
            f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); "
            "set start ≤ end (start = end disables the adapters)."
        )
    return s, e


def adapter_window_active(
    step_index: int, total_steps: int, start_percent: float, end_percent: float
) -> bool:
    """Whether the Lynx adapters act at this step.

    With progress = step_index / total_steps the adapters are on when
    ``start_percent ≤ progress < end_percent``. Since progress never reaches 1, end = 1.0
    includes the last step; start = end never activates; (0, 1) is every step.
    """
    s, e = validate_window(start_percent, end_percent)
    if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer (got {total_steps!r}).")
    if isinstance(step_index, bool) or int(step_index) != step_index or not 0 <= step_index < total_steps:
        raise ValueError(f"step_index must be an integer in [0, {total_steps}) (got {step_index!r}).")
    progress = step_index / total_steps
    return s <= progress < e


def adapter_window_active_sigma(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """Sigma-space version, for samplers that only know the current sigma (ComfyUI).

    ``sigma_start``/``sigma_end`` are the sigmas at start/end percent (e.g. ComfyUI's
    ``model_sampling.percent_to_sigma``), so sigma_start ≥ sigma_end. Active when
    ``sigma_end < sigma ≤ sigma_start``: the same half-open rule as the step version, because
    sigma falls as progress rises (end percent 1.0 maps to sigma 0, which no step evaluates at).
    """
    sg, ss, se = _scale("sigma", sigma), _scale("sigma_start", sigma_start), _scale("sigma_end", sigma_end)
    if ss < 0 or se < 0:
        raise ValueError(f"sigma_start and sigma_end must be ≥ 0 (got {sigma_start}, {sigma_end}).")
    if ss < se:
        raise ValueError(
            f"sigma_start ({sigma_start}) must be ≥ sigma_end ({sigma_end}): the start of the "
            "window is the noisier end. Map start/end percent to sigmas in that order."
        )
    return se < sg <= ss
