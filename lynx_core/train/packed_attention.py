"""Attention over a packed sequence: several samples in one row, no attention across samples.

Tensors are ``[1, L, heads*head_dim]`` (the block's layout); ``q_lens`` / ``k_lens`` give each
sample's query and key counts in order, so query segment i attends to key segment i only.

Kernels (all exact, all train on the CPU and on CUDA; none is SageAttention, which must never run
in training: it is reported to produce broken adapters):

* ``loop``: one SDPA call per segment. No mask at all, memory sum(Lq_i * Lk_i); on the CPU it
  measured 3x faster than ``mask`` and 30x faster than ``nested`` (see docs/training-packing.md).
* ``mask``: one SDPA call with a block-diagonal bool mask (q-segment == k-segment); O(Lq * Lk) mask.
* ``nested``: SDPA on nested jagged tensors (on CUDA it dispatches to the varlen flash /
  memory-efficient kernels; on the CPU it falls back to a slow math path).
* ``flash``: ``flash_attn_varlen_func`` (flash-attn 2 or 3) on CUDA, fp16/bf16 (fp32 is cast to
  bf16 and back, as the inference flash backend does).
* ``sdpa``: the same as ``loop``.
* ``auto``: ``flash`` for fp16/bf16 CUDA tensors when flash-attn is importable, ``loop`` otherwise
  (an fp32 run is never silently downcast).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..attention import AttentionFn, attention_flash, attention_sdpa

KERNELS = ("auto", "loop", "mask", "nested", "flash", "sdpa")
_ALIASES = {"sdpa": "loop"}  # the training config's name for "plain SDPA": per segment, exact


def check_kernel(name: str) -> str:
    """Validate a training attention kernel name (SageAttention is refused, whatever it is called)."""
    key = str(name).lower()
    if "sage" in key:
        raise ValueError(f"attention {name!r}: SageAttention must never run in training (it is reported "
                         f"to produce broken adapters); use one of {', '.join(KERNELS)}")
    if key not in KERNELS:
        raise ValueError(f"unknown training attention {name!r}; use one of {', '.join(KERNELS)}")
    return _ALIASES.get(key, key)


@functools.lru_cache(maxsize=None)
def _flash_varlen_fn() -> Callable | None:
    try:
        from flash_attn_interface import flash_attn_varlen_func  # FA3
        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func  # FA2
        return flash_attn_varlen_func
    except ImportError:
        return None


def _half(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def resolve_kernel(name: str, q: torch.Tensor) -> str:
    """The concrete kernel ``name`` stands for with this query tensor."""
    key = check_kernel(name)
    if key != "auto":
        return key
    if q.is_cuda and _half(q) and _flash_varlen_fn() is not None:
        return "flash"
    return "loop"


def dense_attention(name: str) -> AttentionFn:
    """The batch-1 kernel the per-sample reference uses for the same name (flash or SDPA, never Sage)."""
    key = check_kernel(name)
    if key == "flash":
        return attention_flash
    if key == "auto":
        def auto(q, k, v, heads: int) -> torch.Tensor:
            if q.is_cuda and _half(q) and _flash_varlen_fn() is not None:
                return attention_flash(q, k, v, heads)
            return attention_sdpa(q, k, v, heads)
        return auto
    return attention_sdpa


def _check_lens(q: torch.Tensor, k: torch.Tensor, q_lens: Sequence[int], k_lens: Sequence[int]) -> None:
    if len(q_lens) != len(k_lens):
        raise ValueError(f"packed attention: {len(q_lens)} query segments but {len(k_lens)} key segments")
    if sum(q_lens) != q.shape[1] or sum(k_lens) != k.shape[1]:
        raise ValueError(f"packed attention: segments cover {sum(q_lens)} queries / {sum(k_lens)} keys "
                         f"but the tensors hold {q.shape[1]} / {k.shape[1]}")
    if min(q_lens) <= 0 or min(k_lens) <= 0:
        # An empty key segment would give its queries a softmax over nothing (NaN).
        raise ValueError("packed attention: every segment needs at least one query and one key; "
                         "leave samples without keys out of the call")


def _loop(q, k, v, heads, q_lens, k_lens):
    outs = [attention_sdpa(qi, ki, vi, heads) for qi, ki, vi in
            zip(q.split(q_lens, 1), k.split(k_lens, 1), v.split(k_lens, 1))]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _segment_ids(lens: Sequence[int], device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lens), device=device),
                                   torch.tensor(list(lens), device=device))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.view(1, t.shape[1], heads, t.shape[2] // heads).transpose(1, 2)


def _mask(q, k, v, heads, q_lens, k_lens):
    mask = _segment_ids(q_lens, q.device)[:, None] == _segment_ids(k_lens, q.device)[None, :]
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads), attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape)


def _offsets(lens: Sequence[int], device, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(list(lens)).cumsum(0).tolist()], device=device, dtype=dtype)


def _nested(q, k, v, heads, q_lens, k_lens):
    def jagged(t, lens):
        values = t[0].view(t.shape[1], heads, t.shape[2] // heads)
        return torch.nested.nested_tensor_from_jagged(values, _offsets(lens, t.device)).transpose(1, 2)

    out = F.scaled_dot_product_attention(jagged(q, q_lens), jagged(k, k_lens), jagged(v, k_lens))
    return out.transpose(1, 2).values().reshape(q.shape)


def _flash(q, k, v, heads, q_lens, k_lens):
    fn = _flash_varlen_fn()
    if fn is None:
        raise RuntimeError("training attention 'flash' requested but neither flash_attn nor "
                           "flash_attn_interface is importable; install flash-attn or use 'auto'")
    if not q.is_cuda:
        raise RuntimeError("training attention 'flash' needs CUDA tensors; use 'auto' on the CPU")
    dtype = q.dtype
    half = dtype if _half(q) else torch.bfloat16
    d = q.shape[2] // heads
    qh, kh, vh = (t[0].reshape(t.shape[1], heads, d).to(half) for t in (q, k, v))
    out = fn(qh, kh, vh, _offsets(q_lens, q.device, torch.int32), _offsets(k_lens, q.device, torch.int32),
             max(q_lens), max(k_lens))
    if isinstance(out, tuple):  # FA3 returns (out, lse)
        out = out[0]
    return out.reshape(q.shape).to(dtype)


_IMPLS = {"loop": _loop, "mask": _mask, "nested": _nested, "flash": _flash}


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                      q_lens: Sequence[int], k_lens: Sequence[int], kernel: str = "auto") -> torch.Tensor:
    """Attention of query segment i to key/value segment i only; ``[1, Lq, C]`` in and out."""
    if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
        raise ValueError(f"packed attention takes one packed row, got batches "
                         f"{q.shape[0]}/{k.shape[0]}/{v.shape[0]}")
    q_lens, k_lens = [int(n) for n in q_lens], [int(n) for n in k_lens]
    _check_lens(q, k, q_lens, k_lens)
    return _IMPLS[resolve_kernel(kernel, q)](q, k, v, heads, q_lens, k_lens)


def subset_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     q_lens: Sequence[int], k_lens: Sequence[int], kernel: str = "auto") -> torch.Tensor:
    """Like :func:`segment_attention`, but a sample with no keys (``k_lens[i] == 0``: no ID tokens or
    no reference for it) gets zeros, which the block adds as "no branch" exactly."""
    keep = [i for i, n in enumerate(k_lens) if n > 0]
    if len(keep) == len(k_lens):
        return segment_attention(q, k, v, heads, q_lens, k_lens, kernel)
    parts = q.split(list(q_lens), dim=1)
    kept_lens = [q_lens[i] for i in keep]
    sub = segment_attention(torch.cat([parts[i] for i in keep], dim=1), k, v, heads, kept_lens,
                            [k_lens[i] for i in keep], kernel)
    sub_parts = iter(sub.split(kept_lens, dim=1))
    return torch.cat([next(sub_parts) if k_lens[i] > 0 else torch.zeros_like(parts[i])
                      for i in range(len(q_lens))], dim=1)


class PackedLayout:
    """The :class:`lynx_core.block.TokenLayout` of one packed row for one block.

    ``token_lens``: tokens per sample; ``text_lens``: text tokens per sample; ``ip_lens`` /
    ``ref_lens``: ID / reference keys per sample (0 = none for that sample). Modulation tensors are
    ``[S, 1, C]`` (one row per sample) and are applied segment by segment, so no per-token
    modulation table ([L, 6, C] fp32, 123 KB/token at 14B) is ever built.
    """

    def __init__(self, token_lens: Sequence[int], text_lens: Sequence[int], ip_lens: Sequence[int],
                 ref_lens: Sequence[int], kernel: str = "auto") -> None:
        self.token_lens = [int(n) for n in token_lens]
        self.text_lens = [int(n) for n in text_lens]
        self.ip_lens = [int(n) for n in ip_lens]
        self.ref_lens = [int(n) for n in ref_lens]
        self.kernel = check_kernel(kernel)
        n = len(self.token_lens)
        if not (len(self.text_lens) == len(self.ip_lens) == len(self.ref_lens) == n):
            raise ValueError("PackedLayout: token, text, ip and ref lengths must list the same samples")

    def _check(self, mod: torch.Tensor) -> None:
        if mod.shape[0] != len(self.token_lens) or mod.shape[1] != 1:
            raise ValueError(f"packed modulation must be [samples={len(self.token_lens)}, 1, C], "
                             f"got {list(mod.shape)} (pass e as [samples, 6, C])")

    def _join(self, outs: list[torch.Tensor]) -> torch.Tensor:
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def modulate(self, normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # The expression of DenseLayout.modulate, per sample: element for element the same numbers.
        self._check(shift)
        self._check(scale)
        parts = normed.split(self.token_lens, dim=1)
        return self._join([p * (1 + scale[i]) + shift[i] for i, p in enumerate(parts)])

    def gate(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        self._check(gate)
        return self._join([p * gate[i] for i, p in enumerate(y.split(self.token_lens, dim=1))])

    def attention(self, kind: str) -> AttentionFn:
        lens = {"self": self.token_lens, "text": self.text_lens, "ip": self.ip_lens, "ref": self.ref_lens}
        if kind not in lens:
            raise ValueError(f"unknown attention call {kind!r}")
        k_lens, fn = lens[kind], (subset_attention if kind in ("ip", "ref") else segment_attention)

        def packed(q, k, v, heads: int) -> torch.Tensor:
            return fn(q, k, v, heads, self.token_lens, k_lens, self.kernel)
        return packed
