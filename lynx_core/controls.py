"""Text forms of the sampling controls: block subsets and per-step schedules (parsing and checks only).

Block subsets (``ip_blocks``, ``ref_blocks``)::

    ""          every block (the default)
    "none"      no block (the branch is off everywhere)
    "0-20, 25"  comma-separated block indices and inclusive ranges; spaces and repeats are fine

Schedules (``cfg_schedule``, ``cfg_id_schedule``, ``ip_scale_schedule``, ``ref_scale_schedule``)::

    ""                  the node's constant (e.g. the ``cfg`` widget) at every step
    "5, 5, 4.5, 4"      one value per step; the count must equal the number of steps
    "0:5.0, 0.6:3.0"    keyframes "fraction:value": the value holds from step k = ceil(fraction·N)
                        until the next keyframe (the same k/N rule as start/end percent); the
                        first keyframe must be at 0

A step count is only needed to evaluate a schedule (:meth:`Schedule.value_at`), so a schedule is
parsed and checked for its form first and checked against the steps when they are known.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Schedule", "parse_blocks", "block_subset", "parse_schedule", "as_schedule", "scheduled",
           "step_at_sigma"]

_ITEM_SEP = re.compile(r"[,\n;]")
_RANGE = re.compile(r"^(\d+)\s*(?:-\s*(\d+))?$")
# Keyframe starts are compared with k/N like the adapter window; the slack absorbs decimal
# fractions that are not exact in binary (0.6·5 = 3.0000000000000004).
_EPS = 1e-9


def _items(text: str) -> list[str]:
    return [part.strip() for part in _ITEM_SEP.split(text) if part.strip()]


def parse_blocks(text: str, num_blocks: int, name: str) -> frozenset[int] | None:
    """``"0-20, 25"`` -> the block indices; ``""`` -> None (every block); ``"none"`` -> no block."""
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected text such as '0-20, 25' (got {type(text).__name__})")
    if not text.strip():
        return None
    if text.strip().lower() == "none":
        return frozenset()
    items = _items(text)
    if not items:
        raise ValueError(f"{name}: no block index in {text!r}; leave it empty for every block, "
                         "write 'none' for no block, or list blocks such as '0-20, 25'")
    blocks: set[int] = set()
    for item in items:
        m = _RANGE.match(item)
        if m is None:
            raise ValueError(f"{name}: {item!r} is not a block index or range; write indices and ranges "
                             "separated by commas, such as '0-20, 25' (blocks count from 0)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"{name}: the range {item!r} runs backwards; write '{hi}-{lo}'")
        for b in (lo, hi):
            if b >= num_blocks:
                raise ValueError(f"{name}: block {b} is out of range; the model has {num_blocks} blocks "
                                 f"(0-{num_blocks - 1})")
        blocks.update(range(lo, hi + 1))
    return frozenset(blocks)


def block_subset(value, num_blocks: int, name: str) -> frozenset[int] | None:
    """A subset given as text (see :func:`parse_blocks`), None (every block) or an iterable of indices."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_blocks(value, num_blocks, name)
    blocks = set()
    for b in value:
        if isinstance(b, bool) or int(b) != b:
            raise ValueError(f"{name}: {b!r} is not a block index (use integers from 0)")
        if not 0 <= int(b) < num_blocks:
            raise ValueError(f"{name}: block {int(b)} is out of range; the model has {num_blocks} blocks "
                             f"(0-{num_blocks - 1})")
        blocks.add(int(b))
    return frozenset(blocks)


@dataclass(frozen=True)
class Schedule:
    """A per-step value: one value per step (``starts`` None) or keyframes starting at ``starts``."""
    name: str
    values: tuple[float, ...]
    starts: tuple[float, ...] | None = None

    @property
    def per_step(self) -> bool:
        return self.starts is None

    @property
    def first(self) -> float:
        """The value at step 0 (known without the step count: keyframes start at 0)."""
        return self.values[0]

    def check_steps(self, total_steps: int) -> None:
        """A per-step list must have exactly one value per step."""
        if self.per_step and len(self.values) != int(total_steps):
            raise ValueError(
                f"{self.name}: {len(self.values)} values for {int(total_steps)} steps; give exactly one value "
                f"per step ({int(total_steps)}), or keyframes such as '0:5.0, 0.6:3.0' that fit any step count")

    def value_at(self, step_index: int, total_steps: int) -> float:
        """The value at step ``step_index`` of ``total_steps``."""
        n = int(total_steps)
        if n < 1 or not 0 <= int(step_index) < n:
            raise ValueError(f"{self.name}: step {step_index} is not one of the {n} steps")
        self.check_steps(n)
        if self.per_step:
            return self.values[int(step_index)]
        value = self.values[0]
        for start, v in zip(self.starts, self.values):
            if math.ceil(start * n - _EPS) <= step_index:
                value = v
        return value

    def values_for(self, total_steps: int) -> list[float]:
        return [self.value_at(k, total_steps) for k in range(int(total_steps))]


def _number(name: str, text: str, minimum: float | None) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number; write one value per step such as "
                         "'5, 5, 4.5, 4' or keyframes such as '0:5.0, 0.6:3.0'") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: {text!r} is not a finite number")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: {text!r} is below {minimum:g}; the values must be at least {minimum:g}")
    return v


def parse_schedule(text: str, name: str, minimum: float | None = 0.0) -> Schedule | None:
    """Parse a schedule's text (module docstring); ``""`` -> None (use the constant)."""
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected text such as '5, 5, 4.5, 4' or '0:5.0, 0.6:3.0' "
                        f"(got {type(text).__name__})")
    items = _items(text)
    if not items:
        return None
    keyed = [":" in item for item in items]
    if not any(keyed):
        return Schedule(name, tuple(_number(name, item, minimum) for item in items))
    if not all(keyed):
        raise ValueError(f"{name}: mixes keyframes ('fraction:value') and plain values in {text!r}; use one "
                         "form: '5, 5, 4.5, 4' (one value per step) or '0:5.0, 0.6:3.0' (keyframes)")
    starts, values = [], []
    for item in items:
        frac_text, _, value_text = item.partition(":")
        try:
            frac = float(frac_text)
        except ValueError:
            raise ValueError(f"{name}: {frac_text.strip()!r} in {item!r} is not a fraction of the steps "
                             "(0 to below 1)") from None
        if not (math.isfinite(frac) and 0.0 <= frac < 1.0):
            raise ValueError(f"{name}: keyframe {item!r} starts at {frac_text.strip()}, outside 0 to below 1 "
                             "(the fraction of the steps from which the value holds)")
        if starts and frac <= starts[-1]:
            raise ValueError(f"{name}: keyframe {item!r} does not come after {starts[-1]:g}; list the keyframes "
                             "in increasing order of their fractions")
        starts.append(frac)
        values.append(_number(name, value_text.strip(), minimum))
    if starts[0] != 0.0:
        raise ValueError(f"{name}: the first keyframe must be at 0 (e.g. '0:{values[0]:g}, ...'), so every step "
                         "has a value")
    return Schedule(name, tuple(values), tuple(starts))


def as_schedule(value, name: str, minimum: float | None = 0.0) -> Schedule | None:
    """A schedule given as text, a :class:`Schedule`, None, or a sequence of per-step numbers."""
    if value is None or isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        return parse_schedule(value, name, minimum)
    if isinstance(value, Iterable):
        values = list(value)
        if not values:
            return None
        return Schedule(name, tuple(_number(name, str(v), minimum) for v in _floats(name, values)))
    raise TypeError(f"{name}: expected text, a list of numbers or None (got {type(value).__name__})")


def _floats(name: str, values: Sequence) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool):
            raise ValueError(f"{name}: {v!r} is not a number")
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"{name}: {v!r} is not a number") from None
    return out


def scheduled(schedule: Schedule | None, constant: float, step_index: int | None, total_steps: int | None) -> float:
    """The schedule's value at the step, or ``constant`` without a schedule or a known step."""
    if schedule is None or step_index is None or total_steps is None:
        return float(constant)
    return schedule.value_at(step_index, total_steps)


def step_at_sigma(sigma: float, sigmas: Sequence[float]) -> int:
    """The step of a model call at ``sigma`` for a falling sigma list [σ0, ..., σN] (N steps).

    Step k owns (σ_{k+1}, σ_k]: the same half-open rule as the adapter window in sigma space, so a
    sampler's extra evaluations inside a step (Heun, DPM++ 2S...) count as that step. Sigmas above
    σ0 give step 0, sigmas at or below σ_{N-1}'s end give the last step.
    """
    n = len(sigmas) - 1
    if n < 1:
        raise ValueError(f"a sigma schedule needs at least 2 entries (got {len(sigmas)})")
    sigma = float(sigma)
    for k in range(n):
        nxt = float(sigmas[k + 1])
        # Relative slack: the sigma ComfyUI passes is the same float32 value as the list entry, but
        # it may have gone through a dtype round trip.
        if sigma > nxt + 1e-6 * max(abs(nxt), 1e-3):
            return k
    return n - 1
