"""Image helpers for the detectors: input normalisation and OpenCV-like resizing without OpenCV.

Detectors were trained with OpenCV resizing (SCRFD: ``INTER_LINEAR``; MTCNN: ``INTER_AREA``), so
the same sampling rules are reproduced here as separable gathers (at most a few taps per output
pixel, so a 24 MP photo costs the same as a small one per output pixel).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["to_uint8_rgb", "resize_linear", "resize_area"]


def to_uint8_rgb(image: object, name: str = "image") -> np.ndarray:
    """Return ``image`` as a contiguous uint8 [H, W, 3] RGB array.

    Accepts uint8 arrays, float arrays in [0, 1] (ComfyUI IMAGE tensors), grey [H, W] or
    [H, W, 1] images, and RGBA (alpha dropped). Torch tensors are moved to the CPU first.
    """
    arr = image
    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().float().numpy()  # type: ignore[union-attr]
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected an [H, W, 3] RGB picture, got shape {tuple(arr.shape)}. "
            "Pass one image at a time, or a batch as [N, H, W, 3]."
        )
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"{name}: the picture is only {arr.shape[1]}x{arr.shape[0]} pixels; nothing to detect.")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise ValueError(
                f"{name}: the picture contains {bad} NaN or infinite value(s), so no face can be found in it. "
                "Photos loaded from files never hold such values: the step that made this picture (a decode "
                "of a diverged latent, a division by zero in an image operation) produced them; fix or "
                "replace that step, or use the photo file directly."
            )
        return np.ascontiguousarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"{name}: integer pixel values must be within 0..255, got {arr.min()}..{arr.max()}.")
        return np.ascontiguousarray(arr.astype(np.uint8))
    raise ValueError(f"{name}: unsupported pixel type {arr.dtype}; use uint8 or float in [0, 1].")


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    # cv2 INTER_LINEAR: half-pixel centres, source index clamped at the borders, no antialiasing.
    scale = src / dst
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(pos)
    frac = pos - i0
    i0 = i0.astype(np.int64)
    frac = np.where(i0 < 0, 0.0, frac)
    i0 = np.maximum(i0, 0)
    frac = np.where(i0 >= src - 1, 0.0, frac)
    i0 = np.minimum(i0, src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    return np.stack([i0, i1], axis=1), np.stack([1.0 - frac, frac], axis=1)


def _area_taps(src: int, dst: int, force_upscale_rule: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if dst <= src and not force_upscale_rule:
        # Downscale: each output pixel is the exact area average of the source span it covers.
        scale = src / dst
        ntaps = int(math.ceil(scale)) + 1
        start = np.arange(dst, dtype=np.float64) * scale
        end = start + scale
        first = np.floor(start).astype(np.int64)
        idx = first[:, None] + np.arange(ntaps)[None, :]
        lo = np.maximum(idx.astype(np.float64), start[:, None])
        hi = np.minimum(idx.astype(np.float64) + 1.0, end[:, None])
        weight = np.clip(hi - lo, 0.0, None) / scale
        weight[idx >= src] = 0.0
        return np.minimum(idx, src - 1), weight
    # Upscale: OpenCV's INTER_AREA falls back to a linear filter whose fraction is the part of the
    # output pixel that spills past the source pixel boundary.
    scale = src / dst
    inv = dst / src
    dx = np.arange(dst, dtype=np.float64)
    sx = np.floor(dx * scale)
    frac = (dx + 1) - (sx + 1) * inv
    frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    i0 = sx.astype(np.int64)
    i1 = np.minimum(i0 + 1, src - 1)
    frac = np.where(i0 >= src - 1, 0.0, frac)
    return np.stack([np.minimum(i0, src - 1), i1], axis=1), np.stack([1.0 - frac, frac], axis=1)


def _apply_taps(img: np.ndarray, taps_y: tuple[np.ndarray, np.ndarray], taps_x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    iy, wy = taps_y
    ix, wx = taps_x
    data = img.astype(np.float64, copy=False)
    rows = np.zeros((iy.shape[0],) + data.shape[1:], dtype=np.float64)
    for k in range(iy.shape[1]):
        rows += wy[:, k].reshape((-1,) + (1,) * (data.ndim - 1)) * data[iy[:, k]]
    out = np.zeros((rows.shape[0], ix.shape[0]) + rows.shape[2:], dtype=np.float64)
    for k in range(ix.shape[1]):
        out += wx[:, k].reshape((1, -1) + (1,) * (rows.ndim - 2)) * rows[:, ix[:, k]]
    return out


def _finish(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)


def _linear_fixed_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # OpenCV's 8-bit path: float32 positions, then 11-bit integer weights that sum to 2048.
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0).astype(np.float32)
    frac = np.where(i0 < 0, np.float32(0), frac)
    i0 = np.maximum(i0, 0)
    frac = np.where(i0 >= src - 1, np.float32(0), frac)
    i0 = np.minimum(i0, src - 1)
    c0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int64)
    return i0, np.minimum(i0 + 1, src - 1), c0, 2048 - c0


def resize_linear(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Bilinear resize with ``cv2.resize(..., INTER_LINEAR)`` rules.

    Float input matches OpenCV exactly. uint8 input follows OpenCV's fixed-point vector path
    (11-bit weights, rows shifted to 16 bit, high-half multiplies), which SCRFD saw in training
    and in the official pipeline; it agrees with OpenCV on all but a handful of pixels.
    """
    h, w = img.shape[:2]
    if img.dtype != np.uint8:
        return _finish(_apply_taps(img, _linear_taps(h, out_h), _linear_taps(w, out_w)), img)
    x0, x1, a0, a1 = _linear_fixed_taps(w, out_w)
    y0, y1, b0, b1 = _linear_fixed_taps(h, out_h)
    src = img.astype(np.int64)
    extra = (1,) * (img.ndim - 2)
    rows = src[:, x0] * a0.reshape((1, -1) + extra) + src[:, x1] * a1.reshape((1, -1) + extra)
    top = ((rows[y0] >> 4) * b0.reshape((-1, 1) + extra)) >> 16
    bottom = ((rows[y1] >> 4) * b1.reshape((-1, 1) + extra)) >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def resize_area(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Area resize with ``cv2.resize(..., INTER_AREA)`` rules (exact area mean when shrinking)."""
    h, w = img.shape[:2]
    if out_h <= h and out_w <= w:
        taps_y, taps_x = _area_taps(h, out_h), _area_taps(w, out_w)
    else:
        # OpenCV switches both axes to its area-linear filter as soon as either axis grows.
        taps_y = _area_taps(h, out_h, force_upscale_rule=True)
        taps_x = _area_taps(w, out_w, force_upscale_rule=True)
    return _finish(_apply_taps(img, taps_y, taps_x), img)
