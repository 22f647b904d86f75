"""The objects that travel on the pack's custom sockets.

* ``LYNX_ADAPTERS`` -> :class:`AdaptersHandle` (the adapter weights + ComfyUI memory handle)
* ``LYNX_FACE``     -> ``lynx_core.face.types.FaceIdentity``
* ``LYNX_REF``      -> :class:`ReferenceFeatures` (per-block reference features, face and grey)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

LYNX_ADAPTERS = "LYNX_ADAPTERS"
LYNX_FACE = "LYNX_FACE"
LYNX_REF = "LYNX_REF"


@dataclass
class AdaptersHandle:
    """Loaded Lynx adapters; the weights stay in CPU memory between and during runs.

    Their keys/values depend only on the face, so the sampler streams one adapter layer at a time
    to the GPU before the first step to precompute them (``lynx_core.lynx.LynxPatch.precompute``);
    the 4+ GB of weights never occupy VRAM during the denoising steps."""

    adapters: Any  # lynx_core.adapters.LynxAdapters
    source: str

    @property
    def variant(self) -> str:
        return self.adapters.variant

    @property
    def has_ref(self) -> bool:
        return self.adapters.has_ref

    def __repr__(self) -> str:  # shown in ComfyUI's debug output
        return f"LynxAdapters({self.source}: {self.adapters.summary()})"


@dataclass
class ReferenceFeatures:
    """Per-block normalised self-attention inputs of the reference pass (t = 0, "image of a face").

    ``cond`` is from the aligned face, ``uncond`` from the mid-grey image with the same VAE noise.
    Tensors are [1, tokens, dim] on the offload device, in the model's dtype.
    """

    cond: dict[int, torch.Tensor]
    uncond: dict[int, torch.Tensor]
    dim: int
    num_blocks: int
    seed: int

    def __post_init__(self) -> None:
        if set(self.cond) != set(self.uncond):
            raise ValueError("reference features: the face and grey passes captured different blocks")

    def __repr__(self) -> str:
        first = next(iter(self.cond.values()), None)
        tokens = None if first is None else first.shape[1]
        return f"LynxReference({len(self.cond)} blocks, {tokens} tokens, dim {self.dim}, seed {self.seed})"
