"""Attention backend dispatch: SDPA everywhere, flash-attn / SageAttention on CUDA when importable.

All backends take and return [B, L, heads*head_dim] so the same call site works with ComfyUI's
``optimized_attention`` signature.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
BACKENDS = ("auto", "sdpa", "flash", "sage")


def attention_sdpa(q, k, v, heads: int) -> torch.Tensor:
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, c)


@functools.lru_cache(maxsize=None)
def _flash_fn():
    try:
        from flash_attn_interface import flash_attn_func  # FA3
        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FA2
        return flash_attn_func
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _sage_fn():
    try:
        from sageattention import sageattn
        return sageattn
    except ImportError:
        return None


def _run_nhd(fn, q, k, v, heads: int, **kwargs) -> torch.Tensor:
    """Call a [B, L, H, D] half-precision kernel with our [B, L, H*D] tensors, in and out."""
    b, lq, c = q.shape
    dtype = q.dtype
    half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    out = fn(*(t.reshape(b, -1, heads, c // heads).to(half) for t in (q, k, v)), **kwargs)
    if isinstance(out, tuple):  # FA3 returns (out, lse)
        out = out[0]
    return out.reshape(b, lq, c).to(dtype)


def attention_flash(q, k, v, heads: int) -> torch.Tensor:
    fn = _flash_fn()
    if fn is None:
        raise RuntimeError("attention backend 'flash' requested but neither flash_attn nor "
                           "flash_attn_interface is importable; install flash-attn or use 'sdpa'")
    return _run_nhd(fn, q, k, v, heads)


def attention_sage(q, k, v, heads: int) -> torch.Tensor:
    fn = _sage_fn()
    if fn is None:
        raise RuntimeError("attention backend 'sage' requested but sageattention is not importable; "
                           "pip install sageattention, or use 'sdpa'")
    return _run_nhd(fn, q, k, v, heads, tensor_layout="NHD")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    names = ["sdpa"]
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda and _flash_fn() is not None:
        names.append("flash")
    if on_cuda and _sage_fn() is not None:
        names.append("sage")
    return names


def attention_auto(q, k, v, heads: int) -> torch.Tensor:
    """flash-attn, then SageAttention, for half-precision CUDA tensors; SDPA for everything else
    (an fp32 run is never silently downcast)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _flash_fn() is not None:
            return attention_flash(q, k, v, heads)
        if _sage_fn() is not None:
            return attention_sage(q, k, v, heads)
    return attention_sdpa(q, k, v, heads)


_IMPLS = {"auto": attention_auto, "sdpa": attention_sdpa, "flash": attention_flash, "sage": attention_sage}


def get_attention(backend: str | None = None) -> AttentionFn:
    """Resolve a backend name; the environment variable LYNX_ATTENTION overrides the default 'auto'."""
    backend = (backend or os.environ.get("LYNX_ATTENTION") or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _IMPLS[backend]

