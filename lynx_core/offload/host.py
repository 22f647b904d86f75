"""Host side of block swap: fp8 storage of weights, packing of pinned memory, RAM facts.

Pinned memory comes from PyTorch's caching host allocator, which rounds every request up to a
power of two. Pinning tensor by tensor would waste about 45 % of the RAM for Wan's shapes (a
141.6 MB FFN matrix takes 256 MB). Instead the host masters are packed into a few chunks whose
sizes are themselves powers of two, so almost nothing is lost to rounding.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: Largest finite value of each fp8 format that may store swapped weights.
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}

#: Byte alignment of every tensor inside a host chunk or a GPU ring slot.
ALIGN = 256

#: Largest pinned chunk. Smaller chunks are used at the end, so the total is close to the need.
DEFAULT_CHUNK_BYTES = 1 << 30


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def floor_pow2(n: int) -> int:
    return 0 if n < 1 else 1 << (n.bit_length() - 1)


# ------------------------------------------------------------------------------------------------
# fp8 storage
# ------------------------------------------------------------------------------------------------

def check_host_dtype(host_dtype) -> torch.dtype | None:
    """Validate the ``host_dtype`` option (None keeps the weights' own dtype)."""
    if host_dtype is None:
        return None
    if isinstance(host_dtype, str):
        names = {"fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn,
                 "float8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                 "float8_e5m2": torch.float8_e5m2, "none": None, "": None}
        key = host_dtype.strip().lower()
        if key not in names:
            raise ValueError(f"host_dtype {host_dtype!r} is not supported; use None (keep the weights' "
                             f"dtype), 'fp8_e4m3fn' or 'fp8_e5m2'")
        return names[key]
    if host_dtype not in FP8_MAX:
        raise ValueError(f"host_dtype {host_dtype} is not supported; use None (keep the weights' dtype), "
                         f"torch.float8_e4m3fn or torch.float8_e5m2")
    return host_dtype


def quantizable(t: torch.Tensor) -> bool:
    """Weight matrices get fp8 storage; norms, biases and the modulation table stay exact (they are
    tiny and sensitive)."""
    return t.is_floating_point() and t.ndim == 2 and t.element_size() > 1


def fp8_row_scales(w: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Per-row power-of-two scales s (fp32, [rows]) with max|w_row| / s <= the fp8 maximum.

    A power of two makes ``q * s`` exact in every float dtype, so the upcast on the GPU gives the
    same numbers whatever order the kernels use. A row of zeros gets s = 1.
    """
    rows = w.shape[0]
    amax = w.detach().reshape(rows, -1).abs().amax(dim=1).float()  # abs/max are exact in any dtype
    if not torch.isfinite(amax).all():
        raise ValueError("a weight matrix holds inf or NaN; it cannot be stored as fp8 (set host_dtype=None)")
    mant, exp = torch.frexp(amax / FP8_MAX[fp8_dtype])  # ratio = mant * 2**exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)         # exact powers of two need no step up
    scale = torch.ldexp(torch.ones_like(amax), exp)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def fp8_quantize(w: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q = fp8(w / scale) row by row; dequantize with :func:`fp8_dequantize`."""
    scale = fp8_row_scales(w, fp8_dtype)
    shape = (-1,) + (1,) * (w.ndim - 1)
    # In fp32 the product by a power of two is exact (1/s can exceed the fp16 range).
    wide = w.detach() if w.dtype == torch.float64 else w.detach().float()
    q = (wide * (1.0 / scale).to(wide.dtype).view(shape)).to(fp8_dtype)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights a swapped block computes with when its host copy is fp8."""
    out = q.to(dtype)
    out.mul_(scale.to(q.device).view((-1,) + (1,) * (q.ndim - 1)))
    return out


# ------------------------------------------------------------------------------------------------
# packing pinned chunks
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Packing:
    """Where each item goes: ``place[i] = (chunk, offset)``, chunk -1 meaning "not pinned"."""
    chunk_sizes: list[int]
    place: list[tuple[int, int]]

    @property
    def pinned_bytes(self) -> int:
        return sum(self.chunk_sizes)


def pack_chunks(sizes: list[int], *, budget: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                align: int = ALIGN) -> Packing:
    """First-fit-decreasing packing of ``sizes`` bytes into power-of-two chunks.

    A new chunk is the largest power of two not above what is still to place (capped at
    ``chunk_bytes``), or the next power of two of the item if it is bigger. ``budget`` caps the sum of
    chunk sizes; an item that fits nowhere within it is left unpinned (chunk -1).
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    need = [align_up(max(int(s), 1), align) for s in sizes]
    remaining = sum(need)
    chunks: list[int] = []
    used: list[int] = []
    place: list[tuple[int, int]] = [(-1, 0)] * len(sizes)
    for i in order:
        n = need[i]
        for c, size in enumerate(chunks):
            if used[c] + n <= size:
                place[i] = (c, used[c])
                used[c] += n
                break
        else:
            size = max(min(chunk_bytes, floor_pow2(remaining)), next_pow2(n))
            if budget is not None:
                room = budget - sum(chunks)
                if size > room:
                    size = floor_pow2(room)
                    if size < n:
                        remaining -= n
                        continue  # stays pageable
            chunks.append(size)
            used.append(n)
            place[i] = (len(chunks) - 1, 0)
        remaining -= n
    return Packing(chunk_sizes=chunks, place=place)


def view_bytes(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """A typed view of ``shape`` at byte ``offset`` of a flat uint8 buffer."""
    size = torch.Size(shape)
    nbytes = size.numel() * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + nbytes].view(dtype).view(size)


def allocate_host(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def release_cached_pinned_memory() -> None:
    """Give the pinned blocks PyTorch keeps cached back to the OS (RAM hygiene after a run)."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None and torch.cuda.is_available():
        try:
            fn()
        except RuntimeError:  # older builds without a host cache to empty
            pass


# ------------------------------------------------------------------------------------------------
# RAM facts
# ------------------------------------------------------------------------------------------------

def physical_ram_bytes() -> int | None:
    """Installed RAM, or None when the platform does not say."""
    if sys.platform == "win32":
        class _MemStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
        status = _MemStatus()
        status.dwLength = ctypes.sizeof(_MemStatus)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return int(status.ullTotalPhys)
        return None
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


#: Share of installed RAM that may be pinned when the caller sets no cap. On Windows pinned pages
#: also back the driver's shared GPU memory (WDDM), so the default leaves far more room there.
PIN_SHARE_WINDOWS = 0.40
PIN_SHARE_OTHER = 0.70


def default_pin_limit() -> int | None:
    ram = physical_ram_bytes()
    if ram is None:
        return None
    share = PIN_SHARE_WINDOWS if sys.platform == "win32" else PIN_SHARE_OTHER
    return int(ram * share)


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux/macOS via /proc or getrusage peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
