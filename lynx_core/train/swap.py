"""Block swap of the frozen base during training.

The inference swapper (:class:`lynx_core.offload.BlockSwapper`) repoints each swapped block's
``param.data`` into a ring slot for the duration of one use. Autograd cannot see that: a graph
recorded while the block was in the slot would read, in backward, whatever the parameters point at
by then. So a swapped block never records a graph in forward. It runs as a checkpoint
(:func:`lynx_core.train.runner.recompute_block`): forward under ``no_grad`` inside the swapper,
keeping only its tensor inputs; backward brings the block back into a slot, recomputes it with
grad, back-propagates to the hidden state and the adapter keys/values, and lets the block go
again, all inside one ``use`` of the swapper. Resident blocks take the ordinary checkpoint path.

Prefetch follows the training order: forward in index order, then the last swapped block first
(backward), then the first again (next step's reference pass and forward).

fp8 host storage (``fp8_base=True``) is the swapper's: swapped blocks compute with their
fp8-rounded weights (row-scaled, upcast on the device), resident blocks with their own weights.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..offload import BlockSwapError, BlockSwapper, plan_block_swap
from ..offload.plan import block_tensors
from .runner import ActivationOffload, BlockStep, CheckpointRunner, _needs_grad, recompute_block

log = logging.getLogger(__name__)

FP8_DTYPE = "fp8_e4m3fn"


class SwapRunner:
    """A :class:`~lynx_core.train.runner.BlockRunner` for a frozen base with swapped blocks.

    ``swapper`` must be built (and attached) from the same block list the trainer runs. Use it as
    a context manager or call :meth:`close` when training ends; an exception in forward or backward
    leaves every weight back on its host master, and the runner (and swapper) usable and closable.
    """

    def __init__(self, swapper: BlockSwapper, *, offload: Optional[ActivationOffload] = None):
        self.swapper = swapper
        self.offload = offload
        self._resident = CheckpointRunner(offload)
        self._swapped = set(swapper.plan.streamed)
        self._order = sorted(self._swapped)
        self._check_frozen()

    @classmethod
    def attach(cls, blocks: Sequence[nn.Module], blocks_to_swap: int | str, device, *,
               fp8_base: bool = False, offload_activations: bool | ActivationOffload = False,
               **plan_options) -> "SwapRunner":
        """Plan block swap for ``blocks`` and attach it (the trainer's entry point).

        ``fp8_base`` stores the swapped blocks as fp8 (e4m3, per-row scales) on the host, which
        halves host RAM and bus traffic. ``offload_activations`` parks the checkpointed inputs in
        pinned host RAM (True, or an :class:`ActivationOffload` with your settings).
        ``plan_options`` go to :func:`lynx_core.offload.plan_block_swap` (placement, ring_size,
        pin, pin_limit_bytes, free_bytes, tokens, ...).
        """
        if fp8_base and plan_options.get("host_dtype") not in (None, FP8_DTYPE, torch.float8_e4m3fn):
            raise BlockSwapError("give either fp8_base=True or host_dtype, not both")
        if fp8_base:
            plan_options["host_dtype"] = FP8_DTYPE
        for b, block in enumerate(blocks):
            _refuse_trainable(b, block)
        plan = plan_block_swap(blocks, blocks_to_swap, device, **plan_options)
        swapper = BlockSwapper(blocks, plan)
        offload = offload_activations if isinstance(offload_activations, ActivationOffload) else (
            ActivationOffload() if offload_activations else None)
        try:
            return cls(swapper, offload=offload)
        except BaseException:
            swapper.close()
            raise

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SwapRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the ring (the host masters stay; the next use re-attaches). Safe to call twice."""
        self.swapper.close()

    @property
    def swapped(self) -> list[int]:
        return list(self._order)

    # ------------------------------------------------------------------ training blocks
    def __call__(self, index: int, block: nn.Module, fn: BlockStep, *tensors: Tensor) -> Tensor:
        if block is not self.swapper.blocks[index]:
            raise BlockSwapError(f"SwapRunner: block {index} is not the module the swapper was built for; build "
                                 "the runner from the same block list the trainer runs")
        if index not in self._swapped:
            # Resident: the ordinary checkpoint; entering the swapper only starts the next copies.
            with self.swapper.use(index, upcoming=self._after_forward(index)):
                return self._resident(index, block, fn, *tensors)
        if not _needs_grad(tensors):
            with torch.no_grad(), self.swapper.use(index) as blk:
                return fn(blk, *tensors)
        return recompute_block(index, block, fn, tensors, context=self._context(index), offload=self.offload)

    def _context(self, index: int) -> Callable[[bool], object]:
        def enter(backward: bool):
            upcoming = self._after_backward(index) if backward else self._after_forward(index)
            return self.swapper.use(index, upcoming=upcoming)
        return enter

    def _after_forward(self, index: int) -> list[int]:
        """Swapped blocks used after ``index`` in a training forward: the later ones, then backward."""
        later = [b for b in self._order if b > index]
        return later + self._order[::-1]

    def _after_backward(self, index: int) -> list[int]:
        """Swapped blocks used after ``index``'s backward: the earlier ones, then the next forward."""
        earlier = [b for b in reversed(self._order) if b < index]
        return earlier + self._order

    # ------------------------------------------------------------------ no-grad passes
    def forward_runner(self, model: nn.Module) -> Callable:
        """``runner(tokens, e, freqs, ctx, block_fn=None)`` as :func:`lynx_core.reference.
        extract_reference_features` and ``WanModel.run_blocks`` expect: a no-grad forward through
        every block with the swapped ones streamed by the same swapper."""
        inner = self.swapper.block_runner(model)

        def run(tokens, e, freqs, ctx, block_fn=None):
            with torch.no_grad():
                return inner(tokens, e, freqs, ctx, block_fn)
        return run

    # ------------------------------------------------------------------ checks
    def _check_frozen(self) -> None:
        for b in self._order:
            _refuse_trainable(b, self.swapper.blocks[b])


def _refuse_trainable(index: int, block: nn.Module) -> None:
    for name, t in block_tensors(block):
        if t.requires_grad:
            raise BlockSwapError(
                f"blocks.{index}.{name} requires grad, but training keeps the base frozen and block swap "
                "cannot stream a trainable weight; call model.requires_grad_(False) before building the "
                "SwapRunner (only the adapters train)")


@contextmanager
def swap_runner(blocks: Sequence[nn.Module], blocks_to_swap: int | str, device, **options) -> Iterator[SwapRunner]:
    """``with swap_runner(model.blocks, n, "cuda", fp8_base=True) as runner: ...`` (closes on exit)."""
    runner = SwapRunner.attach(blocks, blocks_to_swap, device, **options)
    try:
        yield runner
    finally:
        runner.close()
