"""Which blocks stay on the GPU and which are streamed: the block-swap plan.

``blocks_to_swap`` is either a count or ``"auto"``. Auto measures the free device memory, takes
off an estimate of the activations for the token count, the ring buffers and a reserve, and keeps
as many blocks resident as fit in the rest.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from .host import (ALIGN, align_up, check_host_dtype, default_pin_limit, fmt_bytes, quantizable)

log = logging.getLogger(__name__)

#: Device memory kept free besides weights, ring and activations: cuBLAS workspaces, allocator
#: fragmentation, the text context, small model parts. Callers add what else their run keeps on the
#: GPU (non-block weights not yet moved, cached adapter keys/values).
DEFAULT_RESERVE_BYTES = 1 << 30

#: The caching allocator rarely packs a block's temporaries perfectly; estimates are scaled by this.
FRAGMENTATION = 1.15

PLACEMENTS = ("spread", "tail")


class BlockSwapError(ValueError):
    """A block-swap option or model that cannot be used; the message says how to fix it."""


def block_tensors(block: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a block once (shared tensors are listed once)."""
    seen: set[int] = set()
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        yield name, t


_PLAIN_TYPES = (torch.Tensor, nn.Parameter) + ((nn.Buffer,) if hasattr(nn, "Buffer") else ())


def is_plain_tensor(t: torch.Tensor) -> bool:
    """A tensor whose bytes are the weight (not a GGUF or other quantized tensor subclass, whose
    metadata would be lost by pointing ``.data`` elsewhere)."""
    return type(t) in _PLAIN_TYPES


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _host_bytes(t: torch.Tensor, host_dtype: torch.dtype | None) -> int:
    if host_dtype is not None and quantizable(t):
        return t.numel() + 4 * t.shape[0]  # fp8 values + one fp32 scale per row
    return tensor_bytes(t)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    return device.index is None or t.device.index == device.index


def normalize_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ------------------------------------------------------------------------------------------------
# activation estimate
# ------------------------------------------------------------------------------------------------

def estimate_activation_bytes(tokens: int, dim: int, ffn_dim: int, dtype: torch.dtype = torch.bfloat16, *,
                              batch: int = 1, context_tokens: int = 512, head_dim: int = 128,
                              rope_bytes: int = 8) -> int:
    """Peak device memory of one Wan block's temporaries for ``batch`` rows of ``tokens`` tokens.

    Counted from :func:`lynx_core.block.wan_block_forward` (per token and channel, s = dtype bytes):

    * self-attention: hidden x, its normalised input, q, k, v, q and k after RoPE (7 s) plus the
      RoPE upcast and complex product of one of them (2 * rope_bytes; lynx_core's DiT rotates in
      float64, ComfyUI in float32);
    * FFN: x, its normalised input and the hidden and GELU tensors (2 s + 2 s * ffn/dim);
    * residual update in fp32: x, y, two fp32 copies and their product (2 s + 12).

    The largest phase counts, plus the RoPE table and the text context, times :data:`FRAGMENTATION`.
    At 480x832x81 (32,760 tokens) with 14B widths in bf16 this is about 5.8 GB per row.
    """
    if tokens <= 0 or dim <= 0:
        raise BlockSwapError(f"the activation estimate needs positive tokens and dim (got {tokens}, {dim})")
    s = torch.empty((), dtype=dtype).element_size()
    per_elem = max(7 * s + 2 * rope_bytes,
                   2 * s + 2 * s * ffn_dim / dim,
                   2 * s + 12)
    rows = tokens * batch
    peak = rows * dim * per_elem
    rope_table = tokens * (head_dim // 2) * 16  # complex128 table, shared by the batch
    context = batch * context_tokens * dim * s * 2
    return int(math.ceil((peak + rope_table + context) * FRAGMENTATION))


def wan_video_tokens(frames: int, height: int, width: int, *, vae_stride=(4, 8, 8), patch=(1, 2, 2)) -> int:
    """Transformer tokens of a Wan2.1 clip: 480x832x81 gives 21*30*52 = 32,760."""
    lat_f = (frames - 1) // vae_stride[0] + 1
    lat_h, lat_w = height // vae_stride[1], width // vae_stride[2]
    return (lat_f // patch[0]) * (lat_h // patch[1]) * (lat_w // patch[2])


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------

@dataclass
class SwapPlan:
    """What a :class:`~lynx_core.offload.BlockSwapper` will do; every size is in bytes.

    ``swapped`` blocks are streamed whole through the ring; ``partial`` blocks (borrowed models
    only) are streamed for the tensors their owner left on the host, e.g. by ComfyUI's partial load.
    """
    device: torch.device
    num_blocks: int
    resident: list[int]
    swapped: list[int]
    partial: list[int] = field(default_factory=list)
    block_bytes: list[int] = field(default_factory=list)
    streamed_device_bytes: dict[int, int] = field(default_factory=dict)
    streamed_host_bytes: dict[int, int] = field(default_factory=dict)
    host_dtype: torch.dtype | None = None
    pin: bool = True
    pin_limit_bytes: int | None = None
    ring_size: int = 2
    ring_bytes: int = 0          # all ring slots plus the fp8 staging buffer
    slot_bytes: int = 0
    activation_bytes: int = 0
    reserve_bytes: int = 0
    free_bytes: int | None = None
    borrowed: bool = False
    placement: str = "spread"
    requested: int | str = 0
    passes: int = 3

    @property
    def streamed(self) -> list[int]:
        """Blocks that go through the ring, in execution order."""
        return sorted(set(self.swapped) | set(self.partial))

    @property
    def resident_bytes(self) -> int:
        return sum(self.block_bytes[b] for b in self.resident)

    @property
    def host_bytes(self) -> int:
        return sum(self.streamed_host_bytes.values())

    @property
    def pinned_bytes(self) -> int:
        """Host RAM the masters will pin (before chunk rounding, which adds a few percent)."""
        if not self.pin or self.device.type != "cuda":
            return 0
        if self.pin_limit_bytes is None:
            return self.host_bytes
        return min(self.host_bytes, self.pin_limit_bytes)

    @property
    def bus_bytes_per_forward(self) -> int:
        """Host-to-device bytes per model call, whatever its batch (rows batched into one call share
        the copies)."""
        return self.host_bytes

    def describe(self) -> str:
        lines = [
            f"block swap on {self.device}: {len(self.resident)}/{self.num_blocks} blocks resident "
            f"({fmt_bytes(self.resident_bytes)}), {len(self.swapped)} swapped"
            + (f", {len(self.partial)} partly on the host" if self.partial else "")
            + f" (asked: {self.requested!r}, placement {self.placement})",
        ]
        if self.streamed:
            dtype = "fp8" if self.host_dtype is not None else "as loaded"
            pinning = ""
            if self.device.type == "cuda":
                pinning = f", pinned {fmt_bytes(self.pinned_bytes)}" if self.pin else ", not pinned"
                if self.pin and self.pin_limit_bytes is not None:
                    pinning += f" (cap {fmt_bytes(self.pin_limit_bytes)})"
            lines.append(
                f"  streamed: blocks {_ranges(self.streamed)}; host copy {fmt_bytes(self.host_bytes)} ({dtype})"
                + pinning
                + f"; ring {self.ring_size} x {fmt_bytes(self.slot_bytes)}"
                + (f" + {fmt_bytes(self.ring_bytes - self.ring_size * self.slot_bytes)} fp8 staging"
                   if self.ring_bytes > self.ring_size * self.slot_bytes else "")
                + "; "
                f"{fmt_bytes(self.bus_bytes_per_forward)} over the bus per model call, "
                f"{fmt_bytes(self.bus_bytes_per_forward * self.passes)} per {self.passes}-pass step "
                "when each pass is its own call")
        budget = f"activations ~{fmt_bytes(self.activation_bytes)}, reserve {fmt_bytes(self.reserve_bytes)}"
        if self.free_bytes is not None:
            budget += f", free device memory {fmt_bytes(self.free_bytes)}"
        lines.append("  " + budget)
        if self.borrowed:
            lines.append("  borrowed model: every weight goes back where it was when the swapper closes")
        return "\n".join(lines)


def _ranges(idx: Sequence[int]) -> str:
    out, start, prev = [], None, None
    for i in sorted(idx):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out) or "none"


def choose_swapped(num_blocks: int, count: int, placement: str = "spread") -> list[int]:
    """Indices of ``count`` blocks to stream.

    ``spread`` puts resident blocks between swapped ones, so each copy overlaps more than one block
    of compute (it matters when a block computes faster than it copies: short clips, the reference
    pass). ``tail`` swaps the last blocks, as most block-swap nodes do.
    """
    if placement not in PLACEMENTS:
        raise BlockSwapError(f"placement {placement!r} is unknown; use one of {PLACEMENTS}")
    if count <= 0:
        return []
    if count >= num_blocks:
        return list(range(num_blocks))
    if placement == "tail":
        return list(range(num_blocks - count, num_blocks))
    return sorted({min(num_blocks - 1, int((j + 0.5) * num_blocks / count)) for j in range(count)})


def measure_free_bytes(device: torch.device, vram_cap_bytes: int | None = None) -> int:
    """Device memory this process can still use: the driver's free memory plus what PyTorch holds
    cached but unused, limited by ``vram_cap_bytes`` (a total for this process, e.g. 24 GB)."""
    if device.type != "cuda":
        raise BlockSwapError(f"free memory can only be measured on CUDA devices, not {device}; "
                             "pass free_bytes or an explicit blocks_to_swap")
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    usable = free + cached
    if vram_cap_bytes is not None:
        usable = min(usable, vram_cap_bytes - torch.cuda.memory_allocated(device))
    return max(int(usable), 0)


def _check_count(blocks_to_swap, n: int) -> int | str:
    if isinstance(blocks_to_swap, str):
        key = blocks_to_swap.strip().lower()
        if key == "auto":
            return "auto"
        try:
            blocks_to_swap = int(key)
        except ValueError:
            raise BlockSwapError(f"blocks_to_swap={blocks_to_swap!r} is not understood; give a number "
                                 f"from 0 to {n} or 'auto'") from None
    if isinstance(blocks_to_swap, bool) or not isinstance(blocks_to_swap, int):
        raise BlockSwapError(f"blocks_to_swap must be an integer from 0 to {n} or 'auto' "
                             f"(got {blocks_to_swap!r})")
    if not 0 <= blocks_to_swap <= n:
        raise BlockSwapError(f"blocks_to_swap={blocks_to_swap} is out of range: this model has {n} blocks; "
                             f"use 0 to {n}, or 'auto'")
    return blocks_to_swap


def _compute_dtype(blocks: Iterable[nn.Module]) -> torch.dtype:
    """The dtype of the largest weight (a block's first tensor can be an fp32 modulation table in
    an otherwise bf16 model); fp8 weights compute in bf16."""
    for block in blocks:
        floats = [t for _name, t in block_tensors(block) if t.is_floating_point()]
        if floats:
            t = max(floats, key=lambda t: t.numel())
            return t.dtype if t.element_size() > 1 else torch.bfloat16
    return torch.float32


def plan_block_swap(blocks: Sequence[nn.Module], blocks_to_swap: int | str = "auto", device=None, *,
                    tokens: int = 0, batch: int = 1, passes: int = 3, dtype: torch.dtype | None = None,
                    activation_bytes: int | None = None, reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                    vram_cap_bytes: int | None = None, free_bytes: int | None = None,
                    host_dtype=None, pin: bool = True, pin_limit_bytes: int | None | str = "auto",
                    ring_size: int = 2, placement: str = "spread", borrowed: bool = False,
                    context_tokens: int = 512, rope_bytes: int = 8) -> SwapPlan:
    """Decide which blocks are resident and which are streamed.

    ``blocks``: the DiT's block list (original Wan names). ``tokens``/``batch``: transformer tokens
    per row and rows per forward (for the activation estimate; ``passes`` forwards per step only
    enter the logged bus traffic). ``free_bytes`` overrides the measurement (tests, or callers that
    know better). ``borrowed``: the model belongs to someone else (ComfyUI): its GPU weights are
    counted as they are, blocks it left partly on the host are streamed too, and nothing is moved
    onto the GPU for good.
    """
    dev = normalize_device(device)
    n = len(blocks)
    count = _check_count(blocks_to_swap, n)
    host_dtype = check_host_dtype(host_dtype)
    if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1:
        raise BlockSwapError(f"ring_size must be an integer >= 1 (got {ring_size!r}); 2 overlaps copy and compute")
    if placement not in PLACEMENTS:
        raise BlockSwapError(f"placement {placement!r} is unknown; use one of {PLACEMENTS}")
    if isinstance(pin_limit_bytes, str):
        if pin_limit_bytes != "auto":
            raise BlockSwapError(f"pin_limit_bytes must be a byte count, None (no cap) or 'auto' "
                                 f"(got {pin_limit_bytes!r})")
        pin_limit_bytes = default_pin_limit()
    if pin_limit_bytes is not None and pin_limit_bytes < 0:
        raise BlockSwapError(f"pin_limit_bytes must be >= 0 (got {pin_limit_bytes})")

    block_bytes, on_device = [], []
    for block in blocks:
        total = here = 0
        for _name, t in block_tensors(block):
            nb = tensor_bytes(t)
            total += align_up(nb, ALIGN)
            here += nb if _on(t, dev) else 0
        block_bytes.append(total)
        on_device.append(here)
    # Blocks holding GGUF or other quantized tensor subclasses cannot be streamed (their owner
    # dequantizes them on the fly, from wherever they are).
    opaque = [(b, name, type(t).__name__) for b in range(n) for name, t in block_tensors(blocks[b])
              if not is_plain_tensor(t)]
    opaque_blocks = {b for b, _name, _kind in opaque}
    partly_off = [b for b in range(n) if b not in opaque_blocks
                  and any(not _on(t, dev) for _nm, t in block_tensors(blocks[b]))]
    if opaque:
        b0, name0, kind0 = opaque[0]
        what = f"blocks.{b0}.{name0} is a {kind0}, not a plain tensor (GGUF or another quantized format?)"
        if count == "auto":
            log.warning("block swap 'auto': %s; block swap streams nothing for this model and leaves its "
                        "offloading to its loader (ComfyUI).", what)
            count = 0
        elif count:
            raise BlockSwapError(f"blocks_to_swap={blocks_to_swap}: {what}, and block swap cannot stream it. "
                                 "Set blocks_to_swap to 0 and let ComfyUI offload this model, or load the "
                                 "model in bf16/fp16/fp8 instead.")

    if activation_bytes is None:
        activation_bytes = 0
        if tokens > 0:
            dim, ffn_dim = _block_widths(blocks[0]) if n else (0, 0)
            activation_bytes = estimate_activation_bytes(
                tokens, dim, ffn_dim, dtype or _compute_dtype(blocks), batch=batch,
                context_tokens=context_tokens, rope_bytes=rope_bytes)

    def streamed_for(swapped: list[int]) -> tuple[list[int], dict[int, int], dict[int, int]]:
        partial = [b for b in partly_off if b not in swapped] if borrowed else []
        dev_b, host_b = {}, {}
        for b in sorted(set(swapped) | set(partial)):
            whole = b in swapped
            dsum = hsum = 0
            for _nm, t in block_tensors(blocks[b]):
                if whole or not _on(t, dev):
                    # A borrowed model's device weights stay exact: they are copied back on close.
                    fp8 = None if borrowed and t.device.type != "cpu" else host_dtype
                    dsum += align_up(tensor_bytes(t), ALIGN)
                    if fp8 is not None and quantizable(t):
                        dsum += align_up(4 * t.shape[0], ALIGN)
                    hsum += _host_bytes(t, fp8)
            dev_b[b], host_b[b] = dsum, hsum
        return partial, dev_b, host_b

    def ring_for(dev_b: dict[int, int]) -> tuple[int, int]:
        if not dev_b:
            return 0, 0
        slots = min(ring_size, len(dev_b))
        staging = 0
        if host_dtype is not None:  # one fp8 tensor at a time is staged on the copy stream
            staging = max((t.numel() for b in dev_b for _nm, t in block_tensors(blocks[b]) if quantizable(t)),
                          default=0)
        return slots, slots * max(dev_b.values()) + align_up(staging, ALIGN)

    free = free_bytes
    if count == "auto":
        if free is None and dev.type == "cuda":
            free = measure_free_bytes(dev, vram_cap_bytes)
        if free is None:
            log.info("block swap 'auto' on %s: no device memory to plan for, nothing is swapped", dev)
            chosen = 0
        else:
            # Memory the blocks may use: what is free now, plus what they already hold there.
            budget = free + sum(on_device) - activation_bytes - reserve_bytes
            chosen = None
            for k in range(n + 1):
                swapped = choose_swapped(n, k, placement)
                _partial, dev_b, _host_b = streamed_for(swapped)
                _slots, ring = ring_for(dev_b)
                cost = sum((on_device[b] if borrowed else block_bytes[b]) for b in range(n) if b not in swapped)
                if cost + ring <= budget:
                    chosen = k
                    break
            if chosen is None:
                chosen = n
                log.warning("block swap 'auto': even with all %d blocks swapped the estimate (activations %s, "
                            "reserve %s, ring) exceeds the free %s; expect out-of-memory. Lower the "
                            "resolution or frame count, or use fp8 weights.", n, fmt_bytes(activation_bytes),
                            fmt_bytes(reserve_bytes), fmt_bytes(free))
    else:
        chosen = count

    swapped = choose_swapped(n, chosen, placement)
    partial, dev_b, host_b = streamed_for(swapped)
    slots, ring = ring_for(dev_b)
    resident = [b for b in range(n) if b not in swapped and b not in partial]
    return SwapPlan(device=dev, num_blocks=n, resident=resident, swapped=swapped, partial=partial,
                    block_bytes=block_bytes, streamed_device_bytes=dev_b, streamed_host_bytes=host_b,
                    host_dtype=host_dtype, pin=pin, pin_limit_bytes=pin_limit_bytes,
                    ring_size=slots or ring_size, ring_bytes=ring, slot_bytes=max(dev_b.values(), default=0),
                    activation_bytes=activation_bytes, reserve_bytes=reserve_bytes, free_bytes=free,
                    borrowed=borrowed, placement=placement, requested=blocks_to_swap, passes=passes)


def _block_widths(block: nn.Module) -> tuple[int, int]:
    """(dim, ffn_dim) from a block with the original Wan names."""
    try:
        ffn_in = block.ffn[0].weight
        return int(ffn_in.shape[1]), int(ffn_in.shape[0])
    except (AttributeError, IndexError, TypeError):
        mod = getattr(block, "modulation", None)
        if mod is None:
            raise BlockSwapError("cannot read the block width: the blocks do not have the original Wan names "
                                 "(ffn.0, modulation); pass activation_bytes explicitly") from None
        return int(mod.shape[-1]), 4 * int(mod.shape[-1])
