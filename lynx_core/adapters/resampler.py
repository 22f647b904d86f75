"""Perceiver Resampler: one ArcFace embedding -> 16 identity tokens.

Module and parameter names follow the official ``resampler.safetensors`` exactly
(``latents``, ``proj_in``, ``layers.{i}.0.*`` attention, ``layers.{i}.1.{0,1,3}`` feed-forward,
``proj_out``, ``norm_out``), so the file loads strictly without any renaming.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# All LayerNorms of the official resampler use the torch default eps.
LAYER_NORM_EPS = 1e-5


class PerceiverAttention(nn.Module):
    """Latents attend to ``[image features, latents]`` (the latents see themselves too)."""

    def __init__(self, dim: int, dim_head: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **fk)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **fk)
        self.to_q = nn.Linear(dim, inner, bias=False, **fk)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False, **fk)
        self.to_out = nn.Linear(inner, dim, bias=False, **fk)

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        # Both operands are pre-scaled by d^-1/4 (instead of dividing the logits by sqrt(d)):
        # same maths, but this is the rounding the official bf16 numbers come from.
        s = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        logits = (q * s) @ (k * s).transpose(-2, -1)
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        out = weights @ v
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, mult: int, device=None, dtype=None) -> nn.Sequential:
    # Index 2 is the parameter-free GELU, hence the 0/1/3 key indices in the official file.
    return nn.Sequential(
        nn.LayerNorm(dim, eps=LAYER_NORM_EPS, device=device, dtype=dtype),
        nn.Linear(dim, dim * mult, bias=False, device=device, dtype=dtype),
        nn.GELU(approximate="none"),
        nn.Linear(dim * mult, dim, bias=False, device=device, dtype=dtype),
    )


class Resampler(nn.Module):
    """ArcFace embedding ``[B, 1, 512]`` (or ``[B, 512]``) -> tokens ``[B, num_queries, output_dim]``."""

    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 5120,
        ff_mult: int = 4,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.dim = dim
        self.depth = depth
        self.dim_head = dim_head
        self.heads = heads
        self.num_queries = num_queries
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        self.ff_mult = ff_mult
        # Official init: randn / sqrt(dim).
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim, **fk) / math.sqrt(dim))
        self.proj_in = nn.Linear(embedding_dim, dim, **fk)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads, **fk), _feed_forward(dim, ff_mult, **fk)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim, **fk)
        self.norm_out = nn.LayerNorm(output_dim, eps=LAYER_NORM_EPS, **fk)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"Resampler input must be [B, {self.embedding_dim}] or [B, 1, {self.embedding_dim}] "
                f"(one ArcFace embedding per sample), got {list(x.shape)}"
            )
        x = x.to(device=self.proj_in.weight.device, dtype=self.proj_in.weight.dtype)
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
