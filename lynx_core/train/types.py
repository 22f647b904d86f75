"""The tensors one training sample is made of, and the fixed embeddings every run needs.

These are what the dataset cache stores and what the trainer consumes: everything the frozen
encoders (VAE, UMT5, ArcFace) produce is computed once, before training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TrainSample:
    """One (identity photo, target, caption) pair, encoded.

    latent:          [16, F', h, w] normalised Wan VAE latent of the target (an image is F' = 1)
    text:            [Lt, text_dim] UMT5 embedding of the caption, trimmed to its real length
    face_embedding:  [512] unit ArcFace embedding of the identity photo
    ref_latent:      [16, 1, 32, 32] latent of the 256-px aligned face crop of the identity photo
    key:             stable name ("person/target.mp4#identity.jpg") for logs and reports
    """
    latent: Tensor
    text: Tensor
    face_embedding: Tensor
    ref_latent: Tensor
    key: str = ""

    @property
    def grid(self) -> tuple[int, int, int]:
        """Latent (frames, height, width) before patchifying."""
        return tuple(self.latent.shape[1:])  # type: ignore[return-value]

    def tokens(self, patch_size: tuple[int, int, int] = (1, 2, 2)) -> int:
        f, h, w = self.grid
        return (f // patch_size[0]) * (h // patch_size[1]) * (w // patch_size[2])


@dataclass
class FixedEmbeddings:
    """Encoded once per run: the reference prompt, the texts that stand for 'no text', the grey face.

    reference_text:  [L, text_dim] "image of a face" (the reference pass's prompt)
    empty_text:      [L, text_dim] the empty prompt
    negative_text:   [L, text_dim] the negative prompt (what the 'no text' dropout feeds, as inference)
    grey_ref_latent: [16, 1, 32, 32] latent of the grey 256-px image ('no identity' reference)
    """
    reference_text: Tensor
    empty_text: Tensor
    negative_text: Tensor
    grey_ref_latent: Tensor

    def to(self, device=None, dtype: torch.dtype | None = None) -> "FixedEmbeddings":
        return FixedEmbeddings(*(t.to(device=device, dtype=dtype) for t in
                                 (self.reference_text, self.empty_text, self.negative_text, self.grey_ref_latent)))
