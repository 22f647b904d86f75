"""3-axis rotary embedding of Wan2.1, in float64 as the reference implementation computes it.

Training asks for ``dtype=torch.float32``: the rotation then runs in complex64, which halves what
autograd keeps per rotated tensor; the angles are still computed in float64 and rounded once.

Tables are cached per (grid, head_dim, theta, max_pos, device, dtype): every pass of every step
asks for the same one, and building it on the host and copying it from pageable memory each time
stalls the device. A cached table is shared, so callers must not modify it in place.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to (time, height, width): 44:42:42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_table(max_pos: int, dim: int, theta: float) -> torch.Tensor:
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles)  # complex128 [max_pos, dim/2]


_COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}


# A few grids at most are live in one process (a generation, its reference pass, a training
# bucket or two); 14B at 480x832x81 is a 34 MB complex128 table.
_CACHE_SIZE = 8
_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def clear_rope_cache() -> None:
    """Drop every cached table (frees their device memory)."""
    _cache.clear()


def rope_cache_size() -> int:
    return len(_cache)


def rope_freqs(grid: tuple[int, int, int], head_dim: int, device=None, theta: float = 10000.0,
               max_pos: int = 1024, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Complex table [F*H*W, head_dim/2] for tokens ordered f-major, then h, then w (cached, shared).

    ``dtype`` is the real precision of the rotation: float64 (complex128, the inference default)
    or float32 (complex64, for training).
    """
    if dtype not in _COMPLEX:
        raise ValueError(f"rope_freqs dtype must be torch.float64 or torch.float32, got {dtype}")
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (tuple(int(g) for g in grid), int(head_dim), float(theta), int(max_pos), dev, dtype)
    table = _cache.get(key)
    if table is not None:
        _cache.move_to_end(key)
        return table
    table = _host_table(key[0], head_dim, theta, max_pos, _COMPLEX[dtype])
    if dev.type != "cpu":
        # Pinned source: the one copy per key is a real async DMA, not a staged pageable copy.
        if dev.type == "cuda":
            table = table.pin_memory()
        table = table.to(dev, non_blocking=dev.type == "cuda")
    _cache[key] = table
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return table


def _host_table(grid, head_dim: int, theta: float, max_pos: int, complex_dtype: torch.dtype) -> torch.Tensor:
    # Built on the host in float64 as the reference does, so the values do not depend on the device.
    f, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    tf, th, tw = (_axis_table(max_pos, d, theta) for d in (dt, dh, dw))
    table = torch.cat([
        tf[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        tw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1)
    return table.reshape(f * h * w, -1).to(dtype=complex_dtype).contiguous()


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive (even, odd) pairs of x [B, L, H, D] by freqs [L, D/2], in the table's
    precision (float64 for a complex128 table, float32 for complex64)."""
    b, s, n, d = x.shape
    real = torch.float32 if freqs.dtype == torch.complex64 else torch.float64
    xc = torch.view_as_complex(x.to(real).reshape(b, s, n, d // 2, 2))
    out = torch.view_as_real(xc * freqs[:s].view(1, s, 1, d // 2)).flatten(3)
    return out.to(x.dtype)
