"""The Lynx cross-attention on Wan image-to-video blocks (Wan2.1-I2V-14B, FLF2V-14B).

Those blocks carry a second key/value set (``cross_attn.k_img, v_img, norm_k_img``) for the CLIP
image tokens that the model's ``img_emb`` puts in *front* of the text context. Both parts are
attended by the same query and their outputs are summed before the output projection; the Lynx IP
branch is added to that sum exactly as on T2V blocks (before ``o``, no RoPE, its own scale).
Wan2.2-I2V-A14B has no image embedder: its blocks are T2V blocks and never come here.

How many image tokens lead the context is not in the tensor: ComfyUI's ``WanModel`` passes
``context_img_len = clip_fea.shape[-2]`` (257 CLIP tokens, 514 for first/last frame) to its
blocks, and ``None`` without a CLIP vision embedding, which slices ``[:None]`` so *both* key/value
sets see the whole text. :func:`split_context` applies that rule; callers hand the block an
:class:`ImageTextContext` built with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .fused import add_branch

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

# The original Wan2.1-I2V code (and ComfyUI's block default) assumes one CLIP image: 257 tokens.
CLIP_IMAGE_TOKENS = 257


@dataclass(frozen=True)
class ImageTextContext:
    """An I2V block's cross-attention context in its two parts, [B, L, dim] each.

    ``image`` None means no image branch at all (the reference pass: no image was given)."""
    text: torch.Tensor
    image: torch.Tensor | None


def split_context(context: torch.Tensor, image_tokens: int | None) -> ImageTextContext:
    """ComfyUI's split of an I2V context: the first ``image_tokens`` rows are the image tokens;
    ``None`` (no CLIP vision embedding) gives both branches the whole context; 0 drops the image branch."""
    if isinstance(context, ImageTextContext):
        return context
    if image_tokens is None:
        return ImageTextContext(text=context, image=context)
    n = int(image_tokens)
    if n == 0:
        return ImageTextContext(text=context, image=None)
    if n < 0 or n >= context.shape[1]:
        raise ValueError(f"an image-to-video context of {context.shape[1]} tokens cannot start with {n} image tokens")
    return ImageTextContext(text=context[:, n:], image=context[:, :n])


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, -1, -1) if t.shape[0] == 1 and batch > 1 else t


def i2v_cross_attention(attn, n2: torch.Tensor, context, attention: AttentionFn,
                        ip: tuple[torch.Tensor, torch.Tensor] | None, ip_scale: float,
                        ip_attention: AttentionFn | None = None) -> torch.Tensor:
    """``o(text_attn + image_attn [+ ip_scale · ip_attn])`` on a block with ``k_img``.

    ``context`` is an :class:`ImageTextContext` (or a plain tensor led by 257 CLIP tokens, the
    original Wan layout). The text and image terms are computed and summed as ComfyUI's
    ``WanI2VCrossAttention`` does, so with no IP branch the result is ComfyUI's.
    """
    ctx = split_context(context, CLIP_IMAGE_TOKENS)
    b = n2.shape[0]
    heads = attn.num_heads
    q = attn.norm_q(attn.q(n2))
    out = attention(q, attn.norm_k(attn.k(ctx.text)), attn.v(ctx.text), heads)
    # Both sums go into the fresh text-attention output (in place outside autograd), as on T2V blocks.
    if ctx.image is not None:
        k_img = attn.norm_k_img(attn.k_img(ctx.image))
        out = add_branch(out, attention(q, k_img, attn.v_img(ctx.image), heads), 1.0)
    if ip is not None and ip_scale != 0.0:
        kip, vip = (_rows(t, b) for t in ip)
        if kip.dtype != q.dtype:
            kip, vip = kip.to(q.dtype), vip.to(q.dtype)
        out = add_branch(out, (ip_attention or attention)(q, kip, vip, heads), ip_scale)
    return attn.o(out)
