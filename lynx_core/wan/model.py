"""Reference Wan2.1 T2V DiT with the original parameter names (as in the Wan checkpoints and ComfyUI).

The block body is :func:`lynx_core.block.wan_block_forward`, the same function that runs inside
ComfyUI, so there is one implementation of the block math.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import AttentionFn, get_attention
from ..block import BlockAdapterInputs, wan_block_forward
from .config import WanConfig
from .rope import apply_rope, rope_freqs


class WanRMSNorm(nn.Module):
    """RMSNorm across the full width; fp32 statistics, cast back before the weight (as Wan does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weight dtype, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class WanAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.norm1 = WanLayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = WanAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = WanLayerNorm(d, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(d, cfg.num_heads, cfg.eps)
        self.norm2 = WanLayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

    def forward(self, x, e, freqs, context, *, attention: AttentionFn,
                adapters: BlockAdapterInputs | None = None, capture=None):
        return wan_block_forward(self, x, e, freqs, context, rope=apply_rope, attention=attention,
                                 adapters=adapters, capture=capture)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.to(temb.dtype) + temb.unsqueeze(1)).chunk(2, dim=1)
        n = F.layer_norm(x.float(), (x.shape[-1],), eps=self.norm.eps)
        return self.head((n * (1 + scale.float()) + shift.float()).to(x.dtype))


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos, sin] layout with frequencies 10000^(-j/half), fp32 (Wan / diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# (block_index, block, x, e, freqs, context) -> x
BlockFn = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class WanModel(nn.Module):
    """Wan2.1 text-to-video DiT. ``forward`` takes latents [B,16,F,H,W], timesteps [B] and text
    embeddings [B,L,text_dim] and returns the velocity in latent shape."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg)
        # "auto": flash-attn / SageAttention for bf16/fp16 on CUDA when importable, SDPA otherwise.
        self.attention: AttentionFn = get_attention()

    # -- pieces, public so the reference pass, block swap and training can reuse them --------------
    def embed(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor):
        """Patchify and embed. Returns (tokens, grid, e [B,6,dim] fp32, temb, context, freqs)."""
        tokens, grid, e, temb, freqs = self.embed_latents(x, timestep)
        return tokens, grid, e, temb, self.embed_text(context), freqs

    def embed_latents(self, x: torch.Tensor, timestep: torch.Tensor):
        """The latent half of :meth:`embed`: (tokens, grid, e, temb, freqs); freqs is a cached,
        shared RoPE table (see :func:`lynx_core.wan.rope.rope_freqs`)."""
        cfg = self.config
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dtype))
        grid = tuple(x.shape[2:])
        tokens = x.flatten(2).transpose(1, 2)
        timestep = timestep.reshape(-1)
        if timestep.numel() == 1 and tokens.shape[0] > 1:
            timestep = timestep.expand(tokens.shape[0])
        temb_dtype = self.time_embedding[0].weight.dtype
        temb = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, timestep).to(temb_dtype))
        e = self.time_projection(temb).unflatten(1, (6, cfg.dim)).float()
        freqs = rope_freqs(grid, cfg.head_dim, device=tokens.device)
        return tokens, grid, e, temb, freqs

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text embeddings [B, L, text_dim] -> [B, L, dim], as given (no padding: the caller's text
        encoder zero-pads to ``config.text_len`` as the official pipeline does)."""
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = x.shape[0]
        pf, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.view(b, f, h, w, pf, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.config.out_dim, f * pf, h * ph, w * pw)

    def run_blocks(self, tokens, e, freqs, ctx, block_fn: BlockFn | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if block_fn is None:
                tokens = block(tokens, e, freqs, ctx, attention=self.attention)
            else:
                tokens = block_fn(i, block, tokens, e, freqs, ctx)
        return tokens

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                block_fn: BlockFn | None = None) -> torch.Tensor:
        tokens, grid, e, temb, ctx, freqs = self.embed(x, timestep, context)
        tokens = self.run_blocks(tokens, e, freqs, ctx, block_fn)
        return self.unpatchify(self.head(tokens, temb), grid)
