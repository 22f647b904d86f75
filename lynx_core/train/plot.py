"""The loss plot: raw training loss (light), its moving average (bold), fixed-t eval loss (points).

The raw loss of a diffusion model is mostly the noise of the random timestep, so on its own it
looks flat; the moving average and the fixed-timestep eval loss are what show progress. Drawn with
Pillow only (matplotlib is not a dependency). The PNG is a live view of the run: each call
replaces it atomically (temporary file + rename), so a viewer never sees half a picture.
"""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageFont

RAW_COLOUR = (170, 196, 230)
AVERAGE_COLOUR = (20, 70, 180)
EVAL_COLOUR = (230, 110, 20)
AXIS_COLOUR = (60, 60, 60)
GRID_COLOUR = (228, 228, 228)
TEXT_COLOUR = (30, 30, 30)
BACKGROUND = (255, 255, 255)

History = Sequence[Union[Mapping[str, Any], float]]


class PlotError(ValueError):
    """Plot arguments that cannot work; the message says what to do."""


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start), same length as ``values``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise PlotError(f"moving-average window must be a positive integer, got {window!r}")
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += float(v)
        if i >= window:
            total -= float(values[i - window])
        out.append(total / min(i + 1, window))
    return out


def default_window(n: int) -> int:
    """About a tenth of the run, between 5 and 100 steps."""
    return max(1, min(100, max(5, n // 10)))


def _points(history: Optional[History], what: str, keys: Sequence[str]) -> list[tuple[float, float]]:
    """(step, loss) pairs with finite losses; plain floats are taken as steps 1, 2, ..."""
    out = []
    for i, item in enumerate(history or []):
        if isinstance(item, Mapping):
            key = next((k for k in keys if k in item), None)
            if key is None:
                raise PlotError(f"{what}[{i}] has no {' or '.join(repr(k) for k in keys)} entry: {dict(item)!r:.120}")
            step, value = item.get("step", i + 1), item[key]
        else:
            step, value = i + 1, item
        try:
            step, value = float(step), float(value)
        except (TypeError, ValueError):
            raise PlotError(f"{what}[{i}] is not a number: {item!r:.120}") from None
        if math.isfinite(value) and math.isfinite(step):
            out.append((step, value))
    return out


def _nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _label(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.2e}"


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = 0.1 * abs(hi) or 1.0
        return lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def loss_plot_png(
    history: History,
    path: Union[str, Path],
    eval_history: Optional[History] = None,
    window: Optional[int] = None,
    size: tuple[int, int] = (960, 540),
    title: str = "training loss",
) -> Path:
    """Draw the loss plot into ``path`` (PNG, replaced atomically) and return the path.

    ``history``: the trainer's loss history (dicts with ``step`` and ``loss``) or plain floats.
    ``eval_history``: dicts with ``step`` and ``loss`` (or ``eval_loss``), drawn as points.
    ``window``: moving-average length in steps (default: about a tenth of the run, 5..100).
    Non-finite losses (a NaN step) are left out of the drawing.
    """
    width, height = size
    if width < 200 or height < 150:
        raise PlotError(f"plot size {size} is too small to draw axes and labels; use at least (200, 150)")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PlotError(f"the loss plot is a PNG; give a path ending in .png, got {path}")
    raw = _points(history, "history", ("loss",))
    evals = _points(eval_history, "eval_history", ("loss", "eval_loss"))
    window = default_window(len(raw)) if window is None else window
    avg = moving_average([v for _, v in raw], window)  # also validates the window when there is no loss yet

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 72, width - 20, 44, height - 48
    draw.text((left, 10), title, fill=TEXT_COLOUR, font=font)

    if not raw and not evals:
        draw.rectangle((left, top, right, bottom), outline=AXIS_COLOUR)
        draw.text((left + 10, top + 10), "no loss recorded yet", fill=TEXT_COLOUR, font=font)
        return _save(img, path)

    steps = [s for s, _ in raw] + [s for s, _ in evals]
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = _range([v for _, v in raw] + [v for _, v in evals])

    def sx(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (right - left)

    def sy(value: float) -> float:
        return bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top)

    for t in _nice_ticks(y_lo, y_hi):
        y = sy(t)
        draw.line((left, y, right, y), fill=GRID_COLOUR)
        draw.line((left - 5, y, left, y), fill=AXIS_COLOUR)
        text = _label(t)
        draw.text((left - 8 - draw.textlength(text, font=font), y - 6), text, fill=TEXT_COLOUR, font=font)
    for t in _nice_ticks(x_lo, x_hi, target=8):
        x = sx(t)
        draw.line((x, bottom, x, bottom + 5), fill=AXIS_COLOUR)
        text = _label(round(t, 6))
        draw.text((x - draw.textlength(text, font=font) / 2, bottom + 8), text, fill=TEXT_COLOUR, font=font)
    draw.line((left, top, left, bottom, right, bottom), fill=AXIS_COLOUR, width=1)
    draw.text(((left + right) / 2 - 12, height - 20), "step", fill=TEXT_COLOUR, font=font)
    draw.text((8, top - 16), "loss", fill=TEXT_COLOUR, font=font)

    if len(raw) == 1:
        x, y = sx(raw[0][0]), sy(raw[0][1])
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=RAW_COLOUR)
    elif raw:
        draw.line([(sx(s), sy(v)) for s, v in raw], fill=RAW_COLOUR, width=1)
    if len(avg) > 1:
        draw.line([(sx(s), sy(v)) for (s, _), v in zip(raw, avg)], fill=AVERAGE_COLOUR, width=3, joint="curve")
    for s, v in evals:
        x, y = sx(s), sy(v)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=EVAL_COLOUR, outline=AXIS_COLOUR)

    legend = [(RAW_COLOUR, "loss", 1), (AVERAGE_COLOUR, f"moving average ({window} steps)", 3)]
    if evals:
        legend.append((EVAL_COLOUR, "fixed-t eval loss", 0))
    x = right
    for colour, text, w in reversed(legend):
        x -= draw.textlength(text, font=font) + 34
        y = 16
        if w:
            draw.line((x, y, x + 22, y), fill=colour, width=w)
        else:
            draw.ellipse((x + 7, y - 4, x + 15, y + 4), fill=colour, outline=AXIS_COLOUR)
        draw.text((x + 28, y - 6), text, fill=TEXT_COLOUR, font=font)
    return _save(img, path)


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            img.save(fh, format="PNG")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
