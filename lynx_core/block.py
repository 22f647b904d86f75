"""The Lynx transformer block: a Wan2.1 block plus the Ref branch (self-attn) and IP branch (cross-attn).

It works on *any* module tree with the original Wan names (``norm1, self_attn.{q,k,v,o,norm_q,norm_k},
norm3, cross_attn.{...}, norm2, ffn, modulation``), so the same code runs on ComfyUI's WanModel and on
lynx_core's reference DiT. RoPE and the attention kernel come in as functions for the same reason.

Numerics follow the official code (diffusers 0.33.1 semantics): modulation and the parameter-free
LayerNorms in fp32, gated residuals added in fp32, the cross-attention residual in the run dtype, the
adapter branches added to the attention output *before* the output projection, no RoPE on either
adapter branch. The fp32 steps run fused (:mod:`lynx_core.fused`): one pass over the hidden state
each, in place where the block owns the tensor and autograd is off.

Where tokens belong to samples is a :class:`TokenLayout`: by default each batch row is one sample
(:class:`DenseLayout`); training's sequence packing (``lynx_core.train.packing``) puts several
samples in one row and supplies per-sample modulation and attention that never crosses samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from .block_i2v import i2v_cross_attention
from .fused import add_branch, gated_residual, norm_modulate, tracks_grad

RopeFn = Callable[[torch.Tensor, object], torch.Tensor]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
CaptureFn = Callable[[torch.Tensor], None]


@dataclass
class BlockAdapterInputs:
    """Per-block adapter keys/values, already projected and key-normed (computed once per generation).

    ``ip``/``ref`` are (K, V) with shape [B or 1, L, dim]; ``None`` (or a zero scale) skips the branch.
    """
    ip: tuple[torch.Tensor, torch.Tensor] | None = None
    ref: tuple[torch.Tensor, torch.Tensor] | None = None
    ip_scale: float = 1.0
    ref_scale: float = 1.0


class TokenLayout(Protocol):
    """How the tokens of ``x`` map to samples (modulation and attention are per sample)."""

    def modulate(self, normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``normed * (1 + scale) + shift`` in fp32, with each sample's own shift/scale."""
        ...

    def gate(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``y * gate`` in fp32, with each sample's own gate."""
        ...

    def attention(self, kind: str) -> AttentionFn:
        """The kernel for one of the block's attention calls: "self", "ref", "text" or "ip"."""
        ...

    # Optional: ``norm_modulate(x, shift, scale, eps)`` and ``gated_residual(x, y, gate, inplace)``
    # replace LayerNorm + ``modulate`` and the ``gate`` residual by fused steps (DenseLayout has them).


@dataclass(frozen=True)
class DenseLayout:
    """One sample per batch row: modulation broadcasts over the row, one kernel for every attention."""
    kernel: AttentionFn

    def modulate(self, normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return normed * (1 + scale) + shift

    def gate(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return y * gate

    # The fused steps (lynx_core.fused); a layout without them runs modulate/gate as written.
    def norm_modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return norm_modulate(x, shift, scale, eps)

    def gated_residual(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, inplace: bool) -> torch.Tensor:
        return gated_residual(x, y, gate, inplace=inplace)

    def attention(self, kind: str) -> AttentionFn:
        return self.kernel


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, -1, -1) if t.shape[0] == 1 and batch > 1 else t


def _kv(pair: tuple[torch.Tensor, torch.Tensor], batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached adapter keys/values as the attention takes them: a broadcast view, no copy when the
    cache already holds the run dtype."""
    k, v = (_rows(t, batch) for t in pair)
    return (k, v) if k.dtype == dtype and v.dtype == dtype else (k.to(dtype), v.to(dtype))


def _per_token(m: torch.Tensor, tokens: int) -> torch.Tensor:
    """Expand a per-frame modulation [B, T, C] to [B, tokens, C] (T == 1 broadcasts as is)."""
    if m.shape[1] in (1, tokens):
        return m
    reps = -(-tokens // m.shape[1])
    return torch.repeat_interleave(m, reps, dim=1)[:, :tokens]


def modulation_chunks(block, e: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """(shift, scale, gate, c_shift, c_scale, c_gate), each [B, 1 or L, dim] in fp32."""
    table = block.modulation.to(device=x.device, dtype=torch.float32)
    if e.ndim == 3:  # [B, 6, dim] (original Wan / lynx_core)
        parts = (table + e.float()).chunk(6, dim=1)
    else:  # [B, T, 6, dim] (ComfyUI passes per-frame modulation)
        parts = (table.unsqueeze(0) + e.float()).unbind(2)
    return [_per_token(p, x.shape[1]) for p in parts]


def _ln(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def self_attention(attn, n1: torch.Tensor, freqs, rope: RopeFn, attention: AttentionFn,
                   ref: tuple[torch.Tensor, torch.Tensor] | None, ref_scale: float,
                   ref_attention: AttentionFn | None = None) -> torch.Tensor:
    b, s, c = n1.shape
    heads = attn.num_heads
    q = attn.norm_q(attn.q(n1))
    k = attn.norm_k(attn.k(n1))
    v = attn.v(n1)
    q_rot = rope(q.view(b, s, heads, c // heads), freqs).reshape(b, s, c)
    k_rot = rope(k.view(b, s, heads, c // heads), freqs).reshape(b, s, c)
    out = attention(q_rot, k_rot, v, heads)
    if ref is not None and ref_scale != 0.0:
        # The ref query is the normed query *before* RoPE, and ref keys carry no RoPE either.
        kr, vr = _kv(ref, b, q.dtype)
        out = add_branch(out, (ref_attention or attention)(q, kr, vr, heads), ref_scale)
    return attn.o(out)


def cross_attention(attn, n2: torch.Tensor, context: torch.Tensor, attention: AttentionFn,
                    ip: tuple[torch.Tensor, torch.Tensor] | None, ip_scale: float,
                    ip_attention: AttentionFn | None = None) -> torch.Tensor:
    if hasattr(attn, "k_img"):  # Wan2.1-I2V / FLF2V blocks: image tokens lead the context
        return i2v_cross_attention(attn, n2, context, attention, ip, ip_scale, ip_attention)
    b = n2.shape[0]
    heads = attn.num_heads
    q = attn.norm_q(attn.q(n2))
    k = attn.norm_k(attn.k(context))
    v = attn.v(context)
    out = attention(q, k, v, heads)
    if ip is not None and ip_scale != 0.0:
        kip, vip = _kv(ip, b, q.dtype)
        out = add_branch(out, (ip_attention or attention)(q, kip, vip, heads), ip_scale)
    return attn.o(out)


def wan_block_forward(block, x: torch.Tensor, e: torch.Tensor, freqs, context: torch.Tensor, *,
                      rope: RopeFn, attention: AttentionFn | None,
                      adapters: BlockAdapterInputs | None = None,
                      capture: CaptureFn | None = None,
                      layout: TokenLayout | None = None) -> torch.Tensor:
    """One Wan block with optional Lynx branches.

    ``capture`` receives the modulated, normalised self-attention input (the tensor the reference
    pass stores per block). ``layout`` (default: one sample per batch row with ``attention`` for
    every call) supplies per-sample modulation and the attention kernels; ``attention`` is unused then.
    """
    shift, scale, gate, c_shift, c_scale, c_gate = modulation_chunks(block, e, x)
    eps = getattr(block.norm1, "eps", 1e-6)
    ad = adapters or BlockAdapterInputs()
    if layout is None:
        if attention is None:
            raise ValueError("wan_block_forward needs an attention function (or a layout that has its own)")
        layout = DenseLayout(attention)

    n1 = _norm_modulate(layout, x, shift, scale, eps)
    if capture is not None:
        capture(n1)
    y = self_attention(block.self_attn, n1, freqs, rope, layout.attention("self"), ad.ref, ad.ref_scale,
                       ref_attention=layout.attention("ref"))
    # A new tensor: from here on the block owns x and may update it in place (outside autograd).
    x = _gated_residual(layout, x, y, gate, inplace=False)

    # Calling norm3 in the run dtype lets ComfyUI's ops cast the affine weights; torch's kernels
    # accumulate LayerNorm in fp32 either way.
    n2 = block.norm3(x)
    ca = cross_attention(block.cross_attn, n2, context, layout.attention("text"), ad.ip, ad.ip_scale,
                         ip_attention=layout.attention("ip")).to(x.dtype)
    x = x + ca if tracks_grad(x, ca) else x.add_(ca)

    n3 = _norm_modulate(layout, x, c_shift, c_scale, eps)
    y = block.ffn(n3)
    return _gated_residual(layout, x, y, c_gate, inplace=True)


def _norm_modulate(layout, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    fused = getattr(layout, "norm_modulate", None)
    if fused is not None:
        return fused(x, shift, scale, eps)
    return layout.modulate(_ln(x, eps), shift, scale).to(x.dtype)


def _gated_residual(layout, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, inplace: bool) -> torch.Tensor:
    fused = getattr(layout, "gated_residual", None)
    if fused is not None:
        return fused(x, y, gate, inplace)
    return (x.float() + layout.gate(y.float(), gate)).to(x.dtype)
