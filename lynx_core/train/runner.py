"""How the trainer runs one frozen DiT block: the seam where checkpointing and block swap plug in.

A block step is ``fn(block, *tensors) -> Tensor``: a pure function of the (frozen) block and of
tensors, some of which need gradients (the hidden state, adapter keys/values). A runner decides
where the block's weights are and what is kept for backward.

* :func:`plain_runner` keeps every activation: the reference the others must equal.
* :class:`CheckpointRunner` keeps only each block's inputs and recomputes the block in backward
  (``torch.utils.checkpoint``); with an :class:`ActivationOffload` those inputs wait in host RAM.
* ``lynx_core.train.swap.SwapRunner`` also streams the weights of swapped blocks (block swap).

Every tensor that needs a gradient must be passed in ``tensors``: a runner that recomputes only
back-propagates to its inputs, so a trainable tensor that ``fn`` reads from a closure would get no
gradient from the recomputed blocks.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

BlockStep = Callable[..., Tensor]


class BlockRunner(Protocol):
    def __call__(self, index: int, block: nn.Module, fn: BlockStep, *tensors: Tensor) -> Tensor: ...


def plain_runner(index: int, block: nn.Module, fn: BlockStep, *tensors: Tensor) -> Tensor:
    """Keep every activation (fastest, most memory); the reference the others must equal."""
    return fn(block, *tensors)


def _needs_grad(tensors: Sequence[object]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------------
# activation offload
# ------------------------------------------------------------------------------------------------

@dataclass
class ActivationOffload:
    """Saved-tensor hooks that park the checkpointed block inputs in host RAM until backward.

    Only tensors that require grad and hold at least ``min_bytes`` leave the device: those are the
    per-block activations (the hidden state, adapter keys/values). The timestep modulation, RoPE
    table and text context do not require grad; they are shared by every block and stay where
    they are (offloading them would copy the same tensor once per block).

    On CUDA the host copies are pinned (``pin=True``) and both directions are asynchronous on the
    compute stream, so stream order keeps them correct. Elsewhere (the CPU tests) a tensor is
    copied into a fresh host tensor, which runs the same path without saving anything.
    """
    pin: bool = True
    min_bytes: int = 1 << 20
    #: Tensors and bytes sent to the host so far (statistics for the plan and the tests).
    packed: int = 0
    packed_bytes: int = 0
    _live_bytes: int = field(default=0, repr=False)
    #: Most bytes held on the host at once.
    peak_host_bytes: int = 0

    def hooks(self) -> ContextManager:
        """The context in which the checkpointed blocks save their inputs."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        nbytes = t.numel() * t.element_size()
        if not t.requires_grad or nbytes < self.min_bytes:
            return t
        pin = self.pin and t.device.type == "cuda"
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        self.packed += 1
        self.packed_bytes += nbytes
        self._live_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self._live_bytes)
        return _Parked(host, t.device, nbytes, self)

    @staticmethod
    def _unpack(packed) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        return packed.fetch()


class _Parked:
    """A saved tensor waiting in host RAM; its host bytes are counted until it is released."""
    __slots__ = ("host", "device", "nbytes", "owner")

    def __init__(self, host: Tensor, device: torch.device, nbytes: int, owner: ActivationOffload):
        self.host, self.device, self.nbytes, self.owner = host, device, nbytes, owner

    def fetch(self) -> Tensor:
        if self.device.type == "cpu":
            return self.host
        return self.host.to(self.device, non_blocking=self.host.is_pinned())

    def __del__(self):
        try:
            self.owner._live_bytes -= self.nbytes
        except Exception:  # interpreter shutdown
            pass


# ------------------------------------------------------------------------------------------------
# recompute: a checkpoint whose block may live elsewhere between forward and backward
# ------------------------------------------------------------------------------------------------

BlockContext = Callable[[bool], ContextManager[nn.Module]]
"""``block_context(backward) -> context manager yielding the block with its weights computable``."""


@dataclass
class _Step:
    index: int
    block: nn.Module
    fn: BlockStep
    context: Optional[BlockContext]

    def enter(self, backward: bool) -> ContextManager[nn.Module]:
        if self.context is None:
            return contextlib.nullcontext(self.block)
        return self.context(backward)


class _RecomputeBlock(torch.autograd.Function):
    """Forward without grad, keep only the tensor inputs; backward brings the block back,
    recomputes it with grad and back-propagates to the inputs that need it.

    The frozen block gets no gradients; the recompute graph lives (and is freed) inside the
    block's context, so a swapped block's weights are still in their ring slot while autograd
    reads them.
    """

    @staticmethod
    def forward(ctx, step: _Step, *args):
        tensor_pos = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.step = step
        ctx.args = [None if i in set(tensor_pos) else a for i, a in enumerate(args)]
        ctx.tensor_pos = tensor_pos
        ctx.save_for_backward(*(args[i] for i in tensor_pos))
        with step.enter(False) as block:
            return step.fn(block, *args)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        needs = [ctx.needs_input_grad[1 + i] for i in ctx.tensor_pos]
        args = list(ctx.args)
        wanted: list[Tensor] = []
        for pos, t, need in zip(ctx.tensor_pos, saved, needs):
            d = t.detach().requires_grad_(need)
            args[pos] = d
            if need:
                wanted.append(d)
        step: _Step = ctx.step
        with step.enter(True) as block, torch.enable_grad():
            out = step.fn(block, *args)
            grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True) if wanted else ()
        result: list[Optional[Tensor]] = [None] * len(args)
        it = iter(grads)
        for pos, need in zip(ctx.tensor_pos, needs):
            if need:
                result[pos] = next(it)
        return (None, *result)


def recompute_block(index: int, block: nn.Module, fn: BlockStep, tensors: Sequence[Tensor], *,
                    context: Optional[BlockContext] = None,
                    offload: Optional[ActivationOffload] = None) -> Tensor:
    """Run one block as a checkpoint through :class:`_RecomputeBlock` (optionally in a block
    context such as the swapper's, optionally with its inputs offloaded)."""
    step = _Step(index, block, fn, context)
    with (offload.hooks() if offload is not None else contextlib.nullcontext()):
        return _RecomputeBlock.apply(step, *tensors)


class CheckpointRunner:
    """Gradient checkpointing per block: keep each block's inputs, recompute it in backward.

    Without offload this is ``torch.utils.checkpoint`` (non-reentrant, with its determinism
    check), and the gradients equal :func:`plain_runner`'s bit for bit on the CPU in fp32. With an
    :class:`ActivationOffload` the block runs through :func:`recompute_block` instead: the
    non-reentrant checkpoint keeps its inputs in a closure that saved-tensor hooks never see,
    whereas the recompute Function saves them through ``save_for_backward``, where the hooks can
    move them to the host.

    A block whose inputs need no gradient (or a call under ``torch.no_grad()``) runs plainly
    under ``no_grad``: nothing of it is needed for backward.
    """

    def __init__(self, offload: Optional[ActivationOffload] = None):
        self.offload = offload

    def __call__(self, index: int, block: nn.Module, fn: BlockStep, *tensors: Tensor) -> Tensor:
        if not _needs_grad(tensors):
            with torch.no_grad():
                return fn(block, *tensors)
        if self.offload is not None:
            return recompute_block(index, block, fn, tensors, offload=self.offload)
        return checkpoint(fn, block, *tensors, use_reentrant=False, preserve_rng_state=True,
                          determinism_check="default")
