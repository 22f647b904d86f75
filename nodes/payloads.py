"""The objects that travel on the pack's custom sockets.

* ``LYNX_ADAPTERS`` -> :class:`AdaptersHandle` (the adapter weights + ComfyUI memory handle)
* ``LYNX_FACE``     -> ``lynx_core.face.types.FaceIdentity``
* ``LYNX_REF``      -> :class:`ReferenceFeatures` (per-block reference features, face and grey)
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

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
    # The ArcFace embedding of the face the features were made from (float32 [512], CPU), so the
    # sampler can tell when its face input is another person; None for references made without one.
    face_embedding: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if set(self.cond) != set(self.uncond):
            raise ValueError("reference features: the face and grey passes captured different blocks")

    @property
    def face_fingerprint(self) -> str:
        return face_fingerprint(self.face_embedding)

    def __repr__(self) -> str:
        first = next(iter(self.cond.values()), None)
        tokens = None if first is None else first.shape[1]
        return (f"LynxReference({len(self.cond)} blocks, {tokens} tokens, dim {self.dim}, seed {self.seed}, "
                f"face {self.face_fingerprint})")


# Embeddings of one photo agree to ~1e-4 across devices and ArcFace backends; two photos of the same
# person score about 0.5-0.9. Below this the reference was made from another face input.
SAME_FACE_COSINE = 0.99


def face_fingerprint(embedding: Optional[torch.Tensor]) -> str:
    """A short, human-comparable name of an identity embedding (shown in logs), or 'none'."""
    if embedding is None:
        return "none"
    rounded = torch.round(embedding.detach().float().cpu().reshape(-1) * 1000).to(torch.int32)
    return hashlib.sha1(rounded.numpy().tobytes()).hexdigest()[:8]


def same_face(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """True when two embeddings are one identity (or when either is unknown: nothing to compare)."""
    if a is None or b is None:
        return True
    a, b = a.detach().float().cpu().reshape(-1), b.detach().float().cpu().reshape(-1)
    if a.shape != b.shape:
        return False
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0)) >= SAME_FACE_COSINE
