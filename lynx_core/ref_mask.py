"""Keep the Ref-adapter off some tokens: a :class:`lynx_core.block.TokenLayout` for one model call.

Why: VACE (Wan2.1-VACE-14B, Wan2.2 VACE-Fun) puts its reference images in front of the video as
extra latent frames, which the sampler denoises and the graph trims off afterwards. They are VACE's
picture of the subject or scene, not frames of the video: Lynx's Ref branch (the face features
cross-attended in self-attention) must not write the face into them, or VACE would read a
Lynx-edited reference. Everything else stays as it is: those tokens still take part in the
self-attention of the other tokens, and the ID-adapter acts on every token as on a T2V model.

The layout is :class:`lynx_core.block.DenseLayout` (one sample per batch row) except for the
"ref" attention, whose output is zero on the masked tokens; on the kept tokens it is the very
same tensor, so their numbers equal an unmasked run bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .block import AttentionFn, DenseLayout


def leading_frames_keep(skip_frames: Sequence[int], frames: int, tokens: int, device=None) -> torch.Tensor | None:
    """``[B, tokens, 1]`` bool, False on the first ``skip_frames[b]`` latent frames of row ``b``.

    Tokens are frame-major (Wan flattens ``[C, F, H, W]`` patches in that order), so a frame is
    ``tokens // frames`` consecutive tokens. Returns None when nothing is skipped, and raises when
    ``tokens`` is not a whole number of ``frames``.
    """
    counts = [max(0, int(n)) for n in skip_frames]
    if not counts or not any(counts):
        return None
    if frames <= 0 or tokens % frames:
        raise ValueError(f"{tokens} tokens are not {frames} whole latent frames")
    per_frame = tokens // frames
    position = torch.arange(tokens, device=device).reshape(1, tokens, 1)
    first_kept = torch.tensor([min(n, frames) * per_frame for n in counts], device=device).reshape(-1, 1, 1)
    return position >= first_kept


@dataclass(frozen=True)
class RefMaskedLayout(DenseLayout):
    """DenseLayout whose Ref-branch output is zero where ``keep`` ([B or 1, L, 1] bool) is False."""
    keep: torch.Tensor | None = None

    def attention(self, kind: str) -> AttentionFn:
        if kind != "ref" or self.keep is None:
            return self.kernel
        kernel, keep = self.kernel, self.keep

        def masked(q, k, v, heads):
            out = kernel(q, k, v, heads)
            return out.masked_fill(~keep.to(out.device), 0)

        return masked
