"""Block swap: stream the weights of swapped blocks through a ring of GPU buffers.

How a swapped block runs (CUDA):

* its weights live on the host as *masters*, made once, pinned where allowed, optionally fp8;
* a dedicated copy stream copies them host-to-device into a free ring slot and records a
  ``ready`` event; the compute stream waits on that event (from pinned masters the host never
  waits; a pageable master, past the pinning cap, makes the driver stage the copy while the host
  waits, which is correct but no faster than a synchronous copy);
* while the block runs, its parameters' ``.data`` point into the slot, so the original module
  (lynx_core's block, ComfyUI's block and everything that reads ``module.weight``) computes with
  the streamed copy; afterwards they point back at the host master (nothing is copied back);
* a ``free`` event recorded after the block's kernels lets the copy stream reuse the slot for the
  next block, which it starts as soon as the slot is free, overlapping the current compute.

Memory safety across the two streams: the ring and the fp8 staging buffer are allocated once, on
the compute stream, when the swapper attaches, and the copy stream only writes into them (it
allocates nothing), so the caching allocator never sees a block change streams and no
``record_stream`` is needed. They are freed only in :meth:`BlockSwapper.close`, after the copy
stream and the last compute that read each slot have finished.

On other devices (CPU in the tests) the copies are plain synchronous copies, but the ring, the
pointer switching, the host masters and fp8 storage run the same code.
"""
from __future__ import annotations

import bisect
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .host import (ALIGN, align_up, allocate_host, fmt_bytes, fp8_quantize, pack_chunks,
                   quantizable, release_cached_pinned_memory, view_bytes)
from .host import fp8_dequantize
from .plan import BlockSwapError, SwapPlan, _on, block_tensors, is_plain_tensor, plan_block_swap

log = logging.getLogger(__name__)

# (block_index, block, x, e, freqs, context) -> x, as lynx_core.wan.model.BlockFn
BlockFn = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]



def _is_host(t: torch.Tensor) -> bool:
    """The tensor lives in host memory (a borrowed original there is kept as it is)."""
    return t.device.type == "cpu"


@dataclass
class _Entry:
    """One streamed tensor of a block."""
    tensor: torch.Tensor                 # the Parameter/buffer object whose .data is switched
    name: str
    shape: torch.Size
    dtype: torch.dtype                   # the dtype the block computes with
    rest: torch.Tensor | None = None     # what .data holds between uses (host master or kept original)
    master: torch.Tensor | None = None   # host copy in storage dtype
    scale: torch.Tensor | None = None    # fp32 row scales when master is fp8
    offset: int = 0                      # byte offset in a ring slot
    scale_offset: int = 0
    restore_to: torch.device | None = None  # borrowed GPU original: copied back there on close
    original: torch.Tensor | None = None    # borrowed GPU original, held until attach succeeds


@dataclass
class _Job:
    """A host master still to be made (and the original it is made from)."""
    entry: _Entry
    src: torch.Tensor
    quantize: bool

    @property
    def master_bytes(self) -> int:
        return self.src.numel() * (1 if self.quantize else self.src.element_size())

    @property
    def scale_offset(self) -> int:
        """Byte offset of the fp32 row scales after the fp8 master, inside the job's packed item."""
        return align_up(self.master_bytes, ALIGN)

    @property
    def nbytes(self) -> int:
        return self.scale_offset + 4 * self.src.shape[0] if self.quantize else self.master_bytes


@dataclass
class _Stream:
    index: int
    entries: list[_Entry]
    nbytes: int
    needs_grad: bool


class _Slot:
    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.block: int | None = None
        self.ready = None   # copy finished (recorded on the copy stream)
        self.free = None    # last compute that read the slot finished (recorded on the compute stream)
        self.in_use = False


@dataclass
class BlockTiming:
    """Debug timing of one block over the uses recorded so far (milliseconds, totals)."""
    block: int
    swapped: bool
    uses: int = 0
    loads: int = 0
    copy_ms: float = 0.0
    compute_ms: float = 0.0
    stall_ms: float = 0.0


class BlockSwapper:
    """Runs a block list with the plan's swapped blocks streamed from host masters.

    Use it as a context manager, or call :meth:`close` in a ``finally``: closing frees the ring
    buffers (and, for a borrowed model, puts every weight back where it was). The host masters
    stay, so the next run reuses them; a borrowed swapper re-attaches by itself on its next use.
    """

    def __init__(self, blocks: Sequence[nn.Module], plan: SwapPlan, *, debug_timing: bool = False):
        if len(blocks) != plan.num_blocks:
            raise BlockSwapError(f"the plan was made for {plan.num_blocks} blocks but {len(blocks)} were given; "
                                 "make the plan from the same block list")
        self.blocks = blocks
        self.plan = plan
        self.device = plan.device
        self.debug_timing = debug_timing
        self._cuda = self.device.type == "cuda"
        self._streams: dict[int, _Stream] = {}
        self._order: list[int] = []
        self._slots: list[_Slot] = []
        self._slot_bytes = 0
        self._staging: torch.Tensor | None = None
        self._staging_bytes = 0
        self._copy_stream = None
        self._chunks: list[torch.Tensor] = []
        self._attached = False
        self._records: list[tuple] = []
        #: Block loads issued so far (each one host-to-device copy of a block).
        self.loads = 0
        #: Host RAM pinned / left pageable for the masters (bytes, real allocation).
        self.pinned_bytes = 0
        self.pageable_bytes = 0
        self.attach()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "BlockSwapper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def ring_allocated(self) -> bool:
        return bool(self._slots)

    @property
    def device_bytes(self) -> int:
        """Device memory the ring (and fp8 staging) takes while allocated."""
        if not self._slots:
            return 0
        return len(self._slots) * self._slot_bytes + (self._staging_bytes if self._staging is not None else 0)

    def masters(self, index: int) -> dict[str, torch.Tensor]:
        """Host masters of a streamed block by parameter name (fp8 ones as stored)."""
        st = self._streams.get(index)
        return {} if st is None else {e.name: e.master for e in st.entries}

    def attach(self) -> None:
        """Make the host masters, put resident blocks on the device and allocate the ring (once;
        idempotent). If anything fails (out of memory, a weight that cannot be streamed), every
        weight is put back where it was before the error is raised."""
        if self._attached:
            return
        try:
            with torch.no_grad(), torch.inference_mode(False):
                if not self.plan.borrowed:
                    for b in self.plan.resident:
                        for _name, t in block_tensors(self.blocks[b]):
                            if not _on(t, self.device):
                                t.data = t.data.to(self.device)
                self._build_entries()
                self._build_masters()
                self._layout()
                # The device originals of a borrowed model were kept for a rollback until now;
                # releasing them gives the ring its room.
                for st in self._streams.values():
                    for e in st.entries:
                        e.original = None
                # Allocated now rather than at the first block, so that an out-of-memory error comes
                # here and ComfyUI's free-memory checks (cond batching) already see the ring.
                self._ensure_ring()
        except BaseException:
            self._rollback()
            raise
        self._attached = True
        log.info("%s\n  host masters: %s pinned, %s pageable", self.plan.describe(),
                 fmt_bytes(self.pinned_bytes), fmt_bytes(self.pageable_bytes))

    def close(self) -> None:
        """Free the ring; for a borrowed model also restore every weight. Safe to call twice.

        The copy stream and the last compute that read each ring slot are waited for first (a host
        sync, once per run), so no copy or kernel is still using the memory that is released.
        """
        for st in self._streams.values():
            for e in st.entries:
                if e.rest is not None:
                    e.tensor.data = e.rest  # in case a use was cut short in a way `finally` could not see
        self._release_ring()
        if self.plan.borrowed and self._attached:
            with torch.no_grad(), torch.inference_mode(False):
                for st in self._streams.values():
                    for e in st.entries:
                        if e.restore_to is not None:
                            e.tensor.data = e.master.to(e.restore_to)  # host-to-device, never back
            self._forget_masters()

    def _release_ring(self) -> None:
        if self._cuda:
            if self._copy_stream is not None:
                self._copy_stream.synchronize()
            for slot in self._slots:
                if slot.free is not None:
                    slot.free.synchronize()
        self._slots = []
        self._staging = None
        self._copy_stream = None

    def _forget_masters(self) -> None:
        self._streams = {}
        self._order = []
        self._chunks = []
        self.pinned_bytes = self.pageable_bytes = 0
        self._attached = False
        release_cached_pinned_memory()

    def _rollback(self) -> None:
        """Undo a failed attach: every streamed weight back to what it was, ring and masters freed."""
        with torch.no_grad(), torch.inference_mode(False):
            for st in self._streams.values():
                for e in st.entries:
                    if e.original is not None:
                        e.tensor.data = e.original   # the borrowed device original, never released
                    elif e.restore_to is not None and e.master is not None:
                        e.tensor.data = e.master.to(e.restore_to)
                    elif self.plan.borrowed:
                        continue                     # host originals were never touched
                    elif e.scale is not None and e.master is not None and e.tensor.dtype != e.dtype:
                        # An owned weight already replaced by its fp8 master: give it its dtype back
                        # (the fp8-rounded values, which is what the swapped block computes with).
                        e.tensor.data = fp8_dequantize(e.master, e.scale, e.dtype)
                    e.original = None
        try:
            self._release_ring()
        finally:
            if self.plan.borrowed:
                self._forget_masters()
            else:
                self._streams, self._order, self._chunks = {}, [], []
                self.pinned_bytes = self.pageable_bytes = 0

    # ------------------------------------------------------------------ building
    def _build_entries(self) -> None:
        plan, dev = self.plan, self.device
        self._streams = {}
        whole = set(plan.swapped)
        for b in plan.streamed:
            entries = []
            needs_grad = False
            for name, t in block_tensors(self.blocks[b]):
                if b not in whole and _on(t, dev):
                    continue  # a borrowed block's weights that are already on the device stay there
                if not is_plain_tensor(t):
                    raise BlockSwapError(
                        f"blocks.{b}.{name} is a {type(t).__name__}, not a plain tensor (GGUF or another "
                        "quantized format?); block swap cannot stream it. Set blocks_to_swap to 0 and let "
                        "ComfyUI offload this model.")
                if t.device.type == "meta":
                    raise BlockSwapError(f"blocks.{b}.{name} has no data (meta tensor); load the weights "
                                         "before planning block swap")
                needs_grad |= bool(t.requires_grad)
                entries.append(_Entry(tensor=t, name=name, shape=t.shape, dtype=t.dtype))
            self._streams[b] = _Stream(index=b, entries=entries, nbytes=0, needs_grad=needs_grad)
        self._order = sorted(self._streams)

    def _build_masters(self) -> None:
        plan, dev = self.plan, self.device
        want_pin = plan.pin and self._cuda
        jobs: list[_Job | None] = []
        for st in self._streams.values():
            for e in st.entries:
                src = e.tensor.data
                # A borrowed model's device weights are copied back on close, so they stay exact.
                q = (plan.host_dtype is not None and quantizable(src)
                     and not (plan.borrowed and not _is_host(src)))
                if not q and _is_host(src) and src.is_contiguous() and (not want_pin or src.is_pinned()):
                    e.master = src  # already where it should be: no copy, no extra RAM
                    self._settle(e, src)
                    continue
                jobs.append(_Job(e, src, q))
        # One packed item per original (an fp8 master and its row scales side by side), so each
        # original is read, quantized and released in one go: its fp8 copy (on the GPU when CUDA
        # quantizes) never waits for another chunk.
        packing = pack_chunks([job.nbytes for job in jobs], budget=plan.pin_limit_bytes if want_pin else 0)
        by_chunk: dict[int, list[int]] = {}
        for i, (c, _off) in enumerate(packing.place):
            by_chunk.setdefault(c, []).append(i)
        self._chunks = []
        self.pinned_bytes = self.pageable_bytes = 0
        # Chunk by chunk, and each original released as soon as its master is complete, so an owned
        # model's RAM peak stays near one copy of the weights plus one chunk.
        pin_refused = False
        for c in sorted(by_chunk, key=lambda c: (c < 0, c)):
            chunk = None
            if c >= 0 and not pin_refused:
                try:
                    chunk = allocate_host(packing.chunk_sizes[c], pin=True)
                except RuntimeError as err:  # the OS refused to lock more pages: stream from pageable RAM
                    pin_refused = True
                    log.warning("block swap: pinning %s more host memory failed (%s); the remaining weights "
                                "stay pageable (correct, but their copies no longer overlap compute). Lower "
                                "pin_limit_bytes to silence this.", fmt_bytes(packing.chunk_sizes[c]), err)
                else:
                    self._chunks.append(chunk)
                    self.pinned_bytes += packing.chunk_sizes[c]
            for i in by_chunk[c]:
                job = jobs[i]
                jobs[i] = None  # our last reference to the original goes with the job
                e, src = job.entry, job.src
                if chunk is None and not job.quantize and _is_host(src) and src.is_contiguous():
                    e.master = src  # over the pinning cap: the original serves, pageable
                    self.pageable_bytes += job.nbytes
                    self._settle(e, src)
                    continue
                scale = None
                if job.quantize:
                    # The GPU quantizes a 14B block in milliseconds; the CPU needs seconds.
                    work = src.to(dev) if self._cuda and _is_host(src) else src
                    value, scale = fp8_quantize(work, plan.host_dtype)
                    del work
                else:
                    value = src
                if chunk is not None:
                    off = packing.place[i][1]
                    master = view_bytes(chunk, off, value.dtype, value.shape)
                    if scale is not None:
                        e.scale = view_bytes(chunk, off + job.scale_offset, scale.dtype, scale.shape)
                else:
                    master = torch.empty(value.shape, dtype=value.dtype)
                    if scale is not None:
                        e.scale = torch.empty(scale.shape, dtype=scale.dtype)
                    self.pageable_bytes += job.nbytes
                master.copy_(value)
                if scale is not None:
                    e.scale.copy_(scale)
                e.master = master
                del value, scale
                self._settle(e, src)

    def _settle(self, e: _Entry, src: torch.Tensor) -> None:
        """Point the tensor at what it holds between uses, and note how to restore it."""
        if self.plan.borrowed:
            if not _is_host(src):
                # Device original: released once attach succeeds (kept until then for a rollback),
                # copied back on close.
                e.restore_to = src.device
                e.original = src
                e.rest = e.master
            else:
                e.rest = src                  # host original: untouched between uses
        else:
            e.rest = e.master                 # owned: the host master is the weight from now on
        e.tensor.data = e.rest

    def _layout(self) -> None:
        self._slot_bytes = 0
        self._staging_bytes = 0
        for st in self._streams.values():
            off = 0
            for e in st.entries:
                e.offset = off
                off += align_up(e.shape.numel() * _itemsize(e.dtype), ALIGN)
                if e.scale is not None:
                    e.scale_offset = off
                    off += align_up(4 * e.shape[0], ALIGN)
                    self._staging_bytes = max(self._staging_bytes, align_up(e.master.numel(), ALIGN))
            st.nbytes = off
            self._slot_bytes = max(self._slot_bytes, off)

    # ------------------------------------------------------------------ the ring
    def _ensure_ring(self) -> None:
        if self._slots or not self._order:
            return
        n = min(self.plan.ring_size, len(self._order))
        # All or nothing: an out-of-memory error on the last buffer must not leave a ring that looks
        # allocated but has no fp8 staging buffer.
        with torch.no_grad(), torch.inference_mode(False):
            slots = [_Slot(torch.empty(self._slot_bytes, dtype=torch.uint8, device=self.device))
                     for _ in range(n)]
            staging = (torch.empty(self._staging_bytes, dtype=torch.uint8, device=self.device)
                       if self._staging_bytes else None)
        stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._slots, self._staging, self._copy_stream = slots, staging, stream

    def _upcoming(self, after: int, k: int, busy: set[int],
                  hint: Optional[Sequence[int]] = None) -> list[int]:
        if hint is not None:
            # The caller knows its order (training: backward runs the blocks in reverse).
            out = []
            for b in hint:
                if b in self._streams and b not in busy and b not in out:
                    out.append(b)
                    if len(out) == k:
                        break
            return out
        order = self._order
        start = bisect.bisect_right(order, after)
        out: list[int] = []
        for j in range(len(order)):
            b = order[(start + j) % len(order)]
            if b in busy or b in out:
                continue
            out.append(b)
            if len(out) == k:
                break
        return out

    def _prefetch(self, after: int, upcoming: Optional[Sequence[int]] = None) -> None:
        """Start copying the next streamed blocks (in execution order, wrapping to the next
        forward, or in the order ``upcoming`` gives) into every slot that is not in use."""
        self._ensure_ring()
        free = [s for s in self._slots if not s.in_use]
        if not free:
            return
        busy = {s.block for s in self._slots if s.in_use}
        targets = self._upcoming(after, len(free), busy, upcoming)
        held = {s.block for s in free}
        spare = sorted((s for s in free if s.block not in targets), key=lambda s: s.block is not None)
        for b in targets:
            if b in held:
                continue
            if not spare:
                break
            self._load(spare.pop(0), b)

    def _slot_for(self, index: int) -> _Slot:
        for s in self._slots:
            if s.block == index and not s.in_use:
                return s
        free = [s for s in self._slots if not s.in_use]
        if not free:
            raise BlockSwapError("every ring slot is in use (nested block calls?); raise ring_size")
        free.sort(key=lambda s: s.block is not None)
        self._load(free[0], index)
        return free[0]

    def _load(self, slot: _Slot, index: int) -> None:
        st = self._streams[index]
        slot.block = None  # a load cut short must not leave a half-filled slot marked valid
        slot.ready = None
        if self._cuda:
            stream = self._copy_stream
            with torch.cuda.stream(stream):
                if slot.free is not None:
                    stream.wait_event(slot.free)
                t0 = self._event(stream) if self.debug_timing else None
                self._copy_into(st, slot.buf)
                if t0 is not None:
                    self._records.append(("copy", index, t0, self._event(stream)))
                ready = torch.cuda.Event()
                ready.record(stream)
            slot.ready = ready
        else:
            t = time.perf_counter()
            self._copy_into(st, slot.buf)
            if self.debug_timing:
                self._records.append(("copy", index, t, time.perf_counter()))
        slot.block = index
        self.loads += 1

    def _copy_into(self, st: _Stream, buf: torch.Tensor) -> None:
        with torch.no_grad():
            for e in st.entries:
                dst = view_bytes(buf, e.offset, e.dtype, e.shape)
                if e.scale is None:
                    dst.copy_(e.master, non_blocking=True)
                    continue
                # fp8 on the host: bring the bytes over, upcast on the device, apply the row scales.
                stage = view_bytes(self._staging, 0, e.master.dtype, e.shape)
                stage.copy_(e.master, non_blocking=True)
                dst.copy_(stage)
                scale = view_bytes(buf, e.scale_offset, torch.float32, (e.shape[0],))
                scale.copy_(e.scale, non_blocking=True)
                dst.mul_(scale.view((-1,) + (1,) * (len(e.shape) - 1)))

    def _event(self, stream):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    # ------------------------------------------------------------------ running blocks
    @contextmanager
    def use(self, index: int, *, upcoming: Optional[Sequence[int]] = None) -> Iterator[nn.Module]:
        """Make block ``index`` computable on the device for the body of the ``with``.

        Yields the original block module. For a swapped block its weights point into a ring slot
        that the compute stream has waited for; on exit they point back at the host masters, even
        when the body raises. ``upcoming`` (optional) lists the blocks the caller will use next, in
        order; the free ring slots are filled with the first streamed ones of them instead of the
        default (the next blocks in index order, wrapping to the next forward).
        """
        if not self._attached:
            self.attach()
        st = self._streams.get(index)
        if st is None:
            if self._order:
                self._prefetch(index, upcoming)
            with self._timed("compute", index):
                yield self.blocks[index]
            return
        if st.needs_grad and torch.is_grad_enabled():
            raise BlockSwapError(f"block {index} is swapped and has parameters that require grad; block swap "
                                 "is for inference: run under torch.no_grad() or freeze the weights")
        self._ensure_ring()
        slot = self._slot_for(index)
        slot.in_use = True
        try:
            self._wait(slot, index)
            with torch.no_grad(), torch.inference_mode(False):
                for e in st.entries:
                    e.tensor.data = view_bytes(slot.buf, e.offset, e.dtype, e.shape)
            self._prefetch(index, upcoming)
            with self._timed("compute", index):
                yield self.blocks[index]
        finally:
            for e in st.entries:
                e.tensor.data = e.rest
            try:
                if self._cuda:
                    # Every kernel that reads the slot is queued by now: the next copy into it waits for this.
                    free = torch.cuda.Event()
                    free.record(torch.cuda.current_stream(self.device))
                    slot.free = free
            finally:
                slot.in_use = False

    def _wait(self, slot: _Slot, index: int) -> None:
        if not self._cuda or slot.ready is None:
            return
        compute = torch.cuda.current_stream(self.device)
        t0 = self._event(compute) if self.debug_timing else None
        compute.wait_event(slot.ready)
        if t0 is not None:
            self._records.append(("stall", index, t0, self._event(compute)))

    @contextmanager
    def _timed(self, kind: str, index: int):
        if not self.debug_timing:
            yield
            return
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            t0 = self._event(compute)
            try:
                yield
            finally:
                self._records.append((kind, index, t0, self._event(compute)))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._records.append((kind, index, t0, time.perf_counter()))

    def wrap(self, block_fn: Optional[BlockFn] = None, *, attention=None) -> BlockFn:
        """A BlockFn that runs ``block_fn`` (default: the block's own forward) inside :meth:`use`."""
        def run(index, block, x, e, freqs, context):
            with self.use(index) as blk:
                if block_fn is not None:
                    return block_fn(index, blk, x, e, freqs, context)
                attn = attention
                if attn is None:
                    from ..attention import get_attention
                    attn = get_attention()
                return blk(x, e, freqs, context, attention=attn)
        return run

    def block_runner(self, model: nn.Module) -> Callable:
        """Drop-in for ``WanModel.run_blocks``: ``runner(tokens, e, freqs, ctx, block_fn=None)``."""
        if model.blocks is not self.blocks:
            raise BlockSwapError("block_runner: this swapper was made for another block list; build it from "
                                 "model.blocks")

        def run(tokens, e, freqs, ctx, block_fn: Optional[BlockFn] = None):
            fn = self.wrap(block_fn, attention=getattr(model, "attention", None))
            for i, block in enumerate(model.blocks):
                tokens = fn(i, block, tokens, e, freqs, ctx)
            return tokens
        return run

    def replace_patch(self, index: int, inner: Optional[Callable] = None) -> Callable[[dict, dict], dict]:
        """A ComfyUI-style block replace patch ``patch(args, extra) -> dict`` for block ``index``.

        Runs ``inner(args, extra)`` (e.g. the Lynx block patch) or, without one,
        ``extra["original_block"](args)``, with the block's weights on the device. Plain dicts only:
        registering it with the model patcher is the caller's job.
        """
        def patch(args: dict, extra: dict) -> dict:
            with self.use(index):
                if inner is not None:
                    return inner(args, extra)
                return extra["original_block"](args)
        return patch

    # ------------------------------------------------------------------ debug timing
    def timings(self) -> list[BlockTiming]:
        """Per-block totals of copy, compute and stall time since the last reset (needs
        ``debug_timing=True``; waits for the device to finish the recorded work)."""
        if self._cuda and self._records:
            torch.cuda.synchronize(self.device)
        out: dict[int, BlockTiming] = {}
        for kind, index, t0, t1 in self._records:
            ms = t0.elapsed_time(t1) if self._cuda else (t1 - t0) * 1e3
            bt = out.setdefault(index, BlockTiming(block=index, swapped=index in self._streams))
            if kind == "copy":
                bt.loads += 1
                bt.copy_ms += ms
            elif kind == "stall":
                bt.stall_ms += ms
            else:
                bt.uses += 1
                bt.compute_ms += ms
        return [out[k] for k in sorted(out)]

    def reset_timings(self) -> None:
        self._records = []

    def timing_report(self) -> str:
        rows = self.timings()
        if not rows:
            return "block swap timing: nothing recorded (debug_timing is off or no block ran)"
        lines = ["block  kind      uses loads  copy ms/load  compute ms/use  stall ms/use"]
        for r in rows:
            lines.append(f"{r.block:5d}  {'swapped' if r.swapped else 'resident':8s} {r.uses:5d} {r.loads:5d} "
                         f"{r.copy_ms / max(r.loads, 1):13.2f} {r.compute_ms / max(r.uses, 1):15.2f} "
                         f"{r.stall_ms / max(r.uses, 1):13.2f}")
        tot_c = sum(r.compute_ms for r in rows)
        tot_s = sum(r.stall_ms for r in rows)
        tot_copy = sum(r.copy_ms for r in rows)
        lines.append(f"total: compute {tot_c:.1f} ms, copy {tot_copy:.1f} ms (overlapped), stall {tot_s:.1f} ms")
        return "\n".join(lines)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------
# helpers for callers
# ------------------------------------------------------------------------------------------------

def attach_block_swap(blocks: Sequence[nn.Module], blocks_to_swap: int | str, device, *,
                      debug_timing: bool = False, **plan_options) -> BlockSwapper:
    """Plan and attach in one call (the entry point for ComfyUI's node layer).

    ``blocks`` is the diffusion model's block list with the original Wan names (ComfyUI:
    ``model_patcher.model.diffusion_model.blocks``); ``plan_options`` go to
    :func:`plan_block_swap` (tokens, batch, host_dtype, pin, pin_limit_bytes, ring_size,
    vram_cap_bytes, reserve_bytes, borrowed, ...). Returns the attached swapper; close it when the
    sampling run ends.
    """
    plan = plan_block_swap(blocks, blocks_to_swap, device, **plan_options)
    return BlockSwapper(blocks, plan, debug_timing=debug_timing)


def move_non_block_parts(model: nn.Module, device) -> None:
    """Put everything of a DiT except ``model.blocks`` on ``device`` (embeddings, head: < 1 GB)."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for t in list(model._parameters.values()) + list(model._buffers.values()):
        if t is not None:
            t.data = t.data.to(device)


@contextmanager
def borrow_to_device(module: nn.Module, device, *, non_blocking: bool = False) -> Iterator[nn.Module]:
    """Temporary device copies of a module's weights, host-to-device only: on exit the module points
    at its original tensors again and the device copies are dropped (no copy back)."""
    dev = torch.device(device)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for _name, t in block_tensors(module):
                if not _on(t, dev):
                    saved.append((t, t.data))
                    t.data = t.data.to(dev, non_blocking=non_blocking)
        yield module
    finally:
        for t, data in saved:
            t.data = data
