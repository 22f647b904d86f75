"""Sequence packing for training (Lynx paper 3.2.1), with the per-sample loop it must equal.

Several samples of different sizes (an image is a 1-frame video) run as ONE sequence of tokens
through the frozen DiT. Nothing crosses samples: self-attention, text cross-attention, ID (ip)
attention and Ref attention are per sample (:mod:`.packed_attention`), 3D RoPE restarts on each
sample's own grid, and the timestep modulation (blocks and head) is each sample's own.

:func:`packed_forward` is the fast path, :func:`looped_forward` the reference (each sample alone,
batch 1). Both run the one block implementation, :func:`lynx_core.block.wan_block_forward`, and
call every block step through a :class:`~.runner.BlockRunner` as
``runner(i, block, fn, x, e, freqs, ctx, *adapter_kv)`` with ``fn`` a pure function of the block
and those tensors, so checkpointing and block-swap runners can wrap it. Patch/text/time
embeddings and the head run outside the runner.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..block import BlockAdapterInputs, wan_block_forward
from ..wan.rope import apply_rope, rope_freqs
from .packed_attention import PackedLayout, check_kernel, dense_attention
from .runner import BlockRunner, plain_runner

log = logging.getLogger(__name__)

KVPair = tuple[Tensor, Tensor]
PACK_STRATEGIES = ("first_fit_decreasing", "in_order")


@dataclass
class NoisySample:
    """One sample as the DiT sees it in a training step.

    x:        [16, F, h, w] noisy latent x_t (F = 1 for an image)
    timestep: 0-dim float tensor, sigma * 1000
    text:     [Lt, text_dim] text embedding (trimmed, Lt >= 1)
    key:      optional name used in error messages
    """
    x: Tensor
    timestep: Tensor
    text: Tensor
    key: str = ""


@dataclass
class SampleAdapterKV:
    """One sample's adapter keys/values for one block, made OUTSIDE the block step (with grad).

    ip:  (k, v), each [1, Lip, dim], from ``to_k_ip`` / ``to_v_ip`` of the ID tokens + registers,
         or None (no ID-adapter on this block).
    ref: (k, v), each [1, Lr, dim], from ``to_k_ref`` / ``to_v_ref`` of the reference features, or
         None. Ref keys are always normed by the block's ``self_attn.norm_k`` inside the block step.
    ip_needs_block_norm: True for the full variant (``k`` is normed by the block's
         ``cross_attn.norm_k`` inside the block step); False for lite (the layer's own
         parameter-free norm was already applied). :func:`adapter_kv` sets it right.
    """
    ip: KVPair | None = None
    ref: KVPair | None = None
    ip_needs_block_norm: bool = True


KVForBlock = Callable[[int], Sequence[SampleAdapterKV]]


def adapter_kv(adapters, index: int, id_tokens: Tensor | None,
               ref_features: Tensor | None) -> SampleAdapterKV:
    """One sample's :class:`SampleAdapterKV` for block ``index`` from ``LynxAdapters`` layers.

    ``id_tokens`` [1, N, id_dim] (``adapters.encode_identity``), ``ref_features`` [1, Lr, dim] (the
    reference pass's capture for this block). This is ``IPAdapterLayer.key_value`` /
    ``RefAdapterLayer.key_value`` with the block-norm part left to the block step.
    """
    ip, needs_norm = None, True
    layer = adapters.ip_layer(index)
    if layer is not None and id_tokens is not None:
        if id_tokens.dim() != 3 or id_tokens.shape[0] != 1 or id_tokens.shape[-1] != layer.id_dim:
            raise ValueError(f"ID tokens for block {index} must be [1, N, {layer.id_dim}] (one sample's "
                             f"resampler output), got {list(id_tokens.shape)}")
        tokens = layer.tokens_with_registers(id_tokens.to(dtype=layer.to_k_ip.weight.dtype))
        k = layer.to_k_ip(tokens)
        if layer.norm_k_ip is not None:
            k, needs_norm = layer.norm_k_ip(k), False
        ip = (k, layer.to_v_ip(tokens))
    ref = None
    ref_layer = adapters.ref_layer(index)
    if ref_layer is not None and ref_features is not None:
        if ref_features.dim() != 3 or ref_features.shape[0] != 1 or ref_features.shape[-1] != ref_layer.dim:
            raise ValueError(f"reference features for block {index} must be [1, Lr, {ref_layer.dim}], "
                             f"got {list(ref_features.shape)}")
        f = ref_features.to(dtype=ref_layer.to_k_ref.weight.dtype)
        ref = (ref_layer.to_k_ref(f), ref_layer.to_v_ref(f))
    return SampleAdapterKV(ip=ip, ref=ref, ip_needs_block_norm=needs_norm)


# ------------------------------------------------------------------------------------ planning
def plan_packs(token_counts: Sequence[int], budget: int, *, strategy: str = "first_fit_decreasing",
               keys: Sequence[str] | None = None) -> list[list[int]]:
    """Group sample indices into packs of at most ``budget`` tokens each (deterministic).

    ``first_fit_decreasing`` (default): samples by decreasing token count (ties: lower index
    first), each into the first pack it fits, packs in order of opening, indices ascending inside a
    pack. ``in_order``: keep the data order, open a new pack when the next sample does not fit.
    """
    if strategy not in PACK_STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; use one of {', '.join(PACK_STRATEGIES)}")
    if int(budget) <= 0:
        raise ValueError(f"token_budget must be a positive number of tokens, got {budget}")
    counts = [int(n) for n in token_counts]
    for i, n in enumerate(counts):
        name = f"sample {i}" + (f" ({keys[i]})" if keys is not None else "")
        if n <= 0:
            raise ValueError(f"{name} has {n} tokens; a sample needs at least one latent frame and patch")
        if n > budget:
            raise ValueError(f"{name} has {n} tokens but token_budget is {budget}: raise token_budget "
                             f"to at least {n}, or put this sample in a smaller bucket (fewer frames or "
                             f"a lower resolution)")
    packs: list[list[int]] = []
    room: list[int] = []
    if strategy == "in_order":
        for i, n in enumerate(counts):
            if not packs or room[-1] < n:
                packs.append([])
                room.append(budget)
            packs[-1].append(i)
            room[-1] -= n
        return packs
    for i in sorted(range(len(counts)), key=lambda j: (-counts[j], j)):
        slot = next((p for p, r in enumerate(room) if r >= counts[i]), None)
        if slot is None:
            packs.append([])
            room.append(budget)
            slot = len(packs) - 1
        packs[slot].append(i)
        room[slot] -= counts[i]
    return [sorted(p) for p in packs]


# ------------------------------------------------------------------------------------ pieces
@dataclass
class _Embedded:
    tokens: Tensor   # [1, L, dim]
    grid: tuple[int, int, int]
    e: Tensor        # [1, 6, dim] fp32
    temb: Tensor     # [1, dim]
    ctx: Tensor      # [1, Lt, dim]
    freqs: Tensor    # [L, head_dim/2] complex64


def _name(i: int, s: NoisySample) -> str:
    return f"sample {i}" + (f" ({s.key})" if s.key else "")


def _check_sample(model, i: int, s: NoisySample) -> None:
    cfg = model.config
    if s.x.dim() != 4 or s.x.shape[0] != cfg.in_dim:
        raise ValueError(f"{_name(i, s)}: x must be a [{cfg.in_dim}, F, h, w] latent, got {list(s.x.shape)}")
    if any(n % p for n, p in zip(s.x.shape[1:], cfg.patch_size)):
        raise ValueError(f"{_name(i, s)}: latent grid {tuple(s.x.shape[1:])} is not divisible by the patch "
                         f"size {cfg.patch_size}; use a bucket whose frames/height/width fit it")
    if torch.as_tensor(s.timestep).numel() != 1:
        raise ValueError(f"{_name(i, s)}: timestep must be one number (sigma * 1000), "
                         f"got shape {list(torch.as_tensor(s.timestep).shape)}")
    if s.text.dim() != 2 or s.text.shape[0] < 1 or s.text.shape[1] != cfg.text_dim:
        raise ValueError(f"{_name(i, s)}: text must be [Lt >= 1, {cfg.text_dim}], got {list(s.text.shape)}")


def _embed(model, s: NoisySample) -> _Embedded:
    t = torch.as_tensor(s.timestep, device=s.x.device).reshape(1)
    tokens, grid, e, temb, ctx, _ = model.embed(s.x.unsqueeze(0), t, s.text.unsqueeze(0))
    # model.embed's float64 table is the inference one; training rotates in float32.
    freqs = rope_freqs(grid, model.config.head_dim, device=tokens.device, dtype=torch.float32)
    return _Embedded(tokens, grid, e, temb, ctx, freqs)


def _velocity(model, tokens: Tensor, emb: _Embedded) -> Tensor:
    return model.unpatchify(model.head(tokens, emb.temb), emb.grid)[0]


def _check_kv(kvs: Sequence[SampleAdapterKV], index: int, n: int, dim: int) -> list[SampleAdapterKV]:
    kvs = list(kvs)
    if len(kvs) != n:
        raise ValueError(f"kv_for_block({index}) returned {len(kvs)} entries for {n} samples; "
                         f"return one SampleAdapterKV per sample, in sample order")
    for j, kv in enumerate(kvs):
        for name, pair in (("ip", kv.ip), ("ref", kv.ref)):
            if pair is None:
                continue
            k, v = pair
            if k.dim() != 3 or k.shape[0] != 1 or k.shape[1] < 1 or k.shape[2] != dim or k.shape != v.shape:
                raise ValueError(f"kv_for_block({index})[{j}].{name}: k and v must both be [1, L >= 1, {dim}], "
                                 f"got {list(k.shape)} and {list(v.shape)}")
    return kvs


def _ip_keys(block, k: Tensor, lens: Sequence[int], needs_norm: Sequence[bool]) -> Tensor:
    """Apply the block's cross_attn.norm_k to the ID keys that need it (the full variant's)."""
    if all(needs_norm):
        return block.cross_attn.norm_k(k)
    if not any(needs_norm):
        return k
    parts = k.split(list(lens), dim=1)
    return torch.cat([block.cross_attn.norm_k(p) if f else p for p, f in zip(parts, needs_norm)], dim=1)


def _adapter_inputs(block, kv: Sequence[Tensor], ip_lens: Sequence[int], ip_norm: Sequence[bool],
                    has_ref: bool, ip_scale: float, ref_scale: float) -> BlockAdapterInputs:
    """Rebuild BlockAdapterInputs inside the block step from the flat (k, v, ...) tensors."""
    rest = list(kv)
    ip = ref = None
    if ip_lens:
        k, v = rest.pop(0), rest.pop(0)
        ip = (_ip_keys(block, k, ip_lens, ip_norm), v)
    if has_ref:
        k, v = rest.pop(0), rest.pop(0)
        ref = (block.self_attn.norm_k(k), v)
    return BlockAdapterInputs(ip=ip, ref=ref, ip_scale=ip_scale, ref_scale=ref_scale)


def _flat_kv(kvs: Sequence[SampleAdapterKV]) -> tuple[list[Tensor], list[int], list[bool], list[int], list[int]]:
    """Pack the samples' keys/values: (tensors, ip lens of samples with ip, their norm flags,
    ip lens per sample (0 = none), ref lens per sample (0 = none))."""
    ips = [kv for kv in kvs if kv.ip is not None]
    refs = [kv for kv in kvs if kv.ref is not None]
    tensors: list[Tensor] = []
    if ips:
        tensors += [_cat([kv.ip[0] for kv in ips]), _cat([kv.ip[1] for kv in ips])]
    if refs:
        tensors += [_cat([kv.ref[0] for kv in refs]), _cat([kv.ref[1] for kv in refs])]
    ip_per = [kv.ip[0].shape[1] if kv.ip is not None else 0 for kv in kvs]
    ref_per = [kv.ref[0].shape[1] if kv.ref is not None else 0 for kv in kvs]
    return (tensors, [kv.ip[0].shape[1] for kv in ips], [kv.ip_needs_block_norm for kv in ips],
            ip_per, ref_per)


def _cat(ts: Sequence[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(list(ts), dim=1)


def _prepare(model, samples: Sequence[NoisySample], attention: str) -> list[_Embedded]:
    check_kernel(attention)
    if not samples:
        raise ValueError("no samples to run: a pack needs at least one sample")
    for i, s in enumerate(samples):
        _check_sample(model, i, s)
    return [_embed(model, s) for s in samples]


# ------------------------------------------------------------------------------------ forwards
def packed_forward(model, samples: Sequence[NoisySample], kv_for_block: KVForBlock,
                   runner: BlockRunner = plain_runner, *, ip_scale: float = 1.0, ref_scale: float = 1.0,
                   attention: str = "auto") -> list[Tensor]:
    """Velocity per sample ([16, F, h, w] each), all samples as one packed sequence.

    ``model`` is lynx_core's WanModel (``embed``, ``blocks``, ``head``, ``unpatchify``);
    ``kv_for_block(i)`` is called once per block, outside the runner; ``attention`` is a kernel of
    :mod:`.packed_attention` (never SageAttention).
    """
    embs = _prepare(model, samples, attention)
    token_lens = [m.tokens.shape[1] for m in embs]
    text_lens = [m.ctx.shape[1] for m in embs]
    x = _cat([m.tokens for m in embs])
    e = torch.cat([m.e for m in embs], dim=0)             # [S, 6, dim]: one modulation row per sample
    freqs = torch.cat([m.freqs for m in embs], dim=0)     # RoPE restarts on each sample's grid
    ctx = _cat([m.ctx for m in embs])
    log.debug("packed forward: %d samples, %d tokens %s, %d text tokens", len(samples), sum(token_lens),
              token_lens, sum(text_lens))
    for i, block in enumerate(model.blocks):
        kvs = _check_kv(kv_for_block(i), i, len(samples), model.config.dim)
        tensors, ip_lens, ip_norm, ip_per, ref_per = _flat_kv(kvs)
        layout = PackedLayout(token_lens, text_lens, ip_per, ref_per, attention)
        has_ref = any(ref_per)

        def step(blk, x, e, freqs, ctx, *kv, _layout=layout, _ip_lens=ip_lens, _ip_norm=ip_norm,
                 _has_ref=has_ref):
            adapters = _adapter_inputs(blk, kv, _ip_lens, _ip_norm, _has_ref, ip_scale, ref_scale)
            return wan_block_forward(blk, x, e, freqs, ctx, rope=apply_rope, attention=None,
                                     adapters=adapters, layout=_layout)

        x = runner(i, block, step, x, e, freqs, ctx, *tensors)
    return [_velocity(model, part, m) for part, m in zip(x.split(token_lens, dim=1), embs)]


def looped_forward(model, samples: Sequence[NoisySample], kv_for_block: KVForBlock,
                   runner: BlockRunner = plain_runner, *, ip_scale: float = 1.0, ref_scale: float = 1.0,
                   attention: str = "auto") -> list[Tensor]:
    """The reference for :func:`packed_forward`: each sample alone (batch 1), float32 RoPE, the
    same block math with a plain ``BlockAdapterInputs``; same arguments, same result."""
    embs = _prepare(model, samples, attention)
    kernel = dense_attention(attention)
    xs = [m.tokens for m in embs]
    for i, block in enumerate(model.blocks):
        kvs = _check_kv(kv_for_block(i), i, len(samples), model.config.dim)
        for j, (m, kv) in enumerate(zip(embs, kvs)):
            tensors, ip_lens, ip_norm, _, _ = _flat_kv([kv])
            has_ref = kv.ref is not None

            def step(blk, x, e, freqs, ctx, *kv_t, _ip_lens=ip_lens, _ip_norm=ip_norm, _has_ref=has_ref):
                adapters = _adapter_inputs(blk, kv_t, _ip_lens, _ip_norm, _has_ref, ip_scale, ref_scale)
                return wan_block_forward(blk, x, e, freqs, ctx, rope=apply_rope, attention=kernel,
                                         adapters=adapters)

            xs[j] = runner(i, block, step, xs[j], m.e, m.freqs, m.ctx, *tensors)
    return [_velocity(model, x, m) for x, m in zip(xs, embs)]
