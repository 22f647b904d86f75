"""Face resemblance per frame: ArcFace cosine similarity of each frame's largest face to an identity.

This is the paper's metric as Lynx Face Similarity computes it, kept here so that the ComfyUI node
and the study scorer (``lynx_batch.study``) run the very same code and so give equal numbers.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["cosine_per_frame", "unit_vector", "missing_frames"]


def unit_vector(embedding: torch.Tensor) -> torch.Tensor:
    """Flattened fp32 CPU copy of ``embedding`` scaled to unit length (a zero vector stays zero)."""
    vec = embedding.detach().float().cpu().reshape(-1)
    return vec / vec.norm().clamp_min(1e-12)


def cosine_per_frame(
    analyzer,
    frames: np.ndarray | Sequence[np.ndarray],
    reference: torch.Tensor,
    cancel: Callable[[], None] | None = None,
) -> list[float | None]:
    """Cosine similarity of the largest face in each frame to ``reference`` (None: no face there).

    ``analyzer`` is a :class:`lynx_core.face.FaceAnalyzer`; each frame (uint8 RGB [H, W, 3]) goes
    through ``analyzer.encode`` on its own with ``select="largest"``, exactly like an identity
    photo, so a frame's score equals the cosine of the identity one would encode from it.
    ``cancel`` is called before every frame and may raise to stop early (ComfyUI's interrupt).
    """
    ref = unit_vector(reference)
    scores: list[float | None] = []
    for frame in frames:
        if cancel is not None:
            cancel()
        ident = analyzer.encode(frame[None], select="largest", on_no_face="skip", warn_skipped=False)
        if ident.embedding is None:
            scores.append(None)
            continue
        scores.append(float(torch.dot(unit_vector(ident.embedding), ref)))
    return scores


def missing_frames(scores: Sequence[float | None]) -> list[int]:
    """Indices of the frames where no face was found."""
    return [i for i, s in enumerate(scores) if s is None]
