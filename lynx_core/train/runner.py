"""How the trainer runs one frozen DiT block: the seam where checkpointing and block swap plug in.

A block step is ``fn(block, *tensors) -> Tensor``: a pure function of the (frozen) block and of
tensors, some of which need gradients (the hidden state, adapter keys/values). A runner decides
where the block's weights are and what is kept for backward.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor, nn

BlockStep = Callable[..., Tensor]


class BlockRunner(Protocol):
    def __call__(self, index: int, block: nn.Module, fn: BlockStep, *tensors: Tensor) -> Tensor: ...


def plain_runner(index: int, block: nn.Module, fn: BlockStep, *tensors: Tensor) -> Tensor:
    """Keep every activation (fastest, most memory); the reference the others must equal."""
    return fn(block, *tensors)
