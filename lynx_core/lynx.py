"""Per-generation Lynx state: identity tokens, reference features and the cached adapter keys/values.

The adapters' keys and values depend only on the face, never on the step, so each block's
``to_k_ip/to_v_ip`` and ``to_k_ref/to_v_ref`` run once per generation and identity; the 4+ GB of
adapter weights are then not needed on the GPU during the denoising steps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .block import BlockAdapterInputs
from .offload import borrow_to_device

log = logging.getLogger(__name__)

COND = "cond"      # the face (used by the cond pass and the image-only pass)
UNCOND = "uncond"  # no identity: resampler(0) and the grey-image reference
IDENTITIES = (COND, UNCOND)


@dataclass
class LynxConditioning:
    """What a face contributes to one generation (all tensors with batch 1)."""
    id_tokens: dict[str, torch.Tensor]                                 # identity -> [1, 16, id_dim]
    ref_features: dict[str, dict[int, torch.Tensor]] | None = None     # identity -> block -> [1, Lr, dim]

    def __post_init__(self):
        for key in IDENTITIES:
            if key not in self.id_tokens:
                raise ValueError(f"LynxConditioning.id_tokens needs both {IDENTITIES}, got {list(self.id_tokens)}")


def make_conditioning(adapters, embedding: torch.Tensor | None,
                      ref_cond: dict[int, torch.Tensor] | None = None,
                      ref_uncond: dict[int, torch.Tensor] | None = None) -> LynxConditioning:
    """ID tokens for the face and for 'no identity' (resampler of a zero vector, as the official code)."""
    with torch.no_grad():
        cond = adapters.encode_identity(embedding)
        uncond = adapters.encode_identity(None)
    refs = None
    if ref_cond is not None:
        if ref_uncond is None:
            raise ValueError("reference features need both the face (cond) and grey-image (uncond) buffers")
        refs = {COND: ref_cond, UNCOND: ref_uncond}
    return LynxConditioning(id_tokens={COND: cond, UNCOND: uncond}, ref_features=refs)


@dataclass
class AdapterKVCache:
    adapters: object
    conditioning: LynxConditioning
    _ip: dict = field(default_factory=dict)
    _ref: dict = field(default_factory=dict)

    def ip_kv(self, index: int, block, identity: str, device, dtype):
        key = (index, identity)
        if key not in self._ip:
            layer = self.adapters.ip_layers[str(index)] if str(index) in self.adapters.ip_layers else None
            if layer is None:
                self._ip[key] = None
            else:
                with torch.no_grad(), borrow_to_device(layer, device):
                    tokens = self.conditioning.id_tokens[identity].to(device=device, dtype=next(layer.parameters()).dtype)
                    k, v = layer.key_value(tokens, block.cross_attn.norm_k)
                self._ip[key] = (k.to(dtype), v.to(dtype))
        return self._ip[key]

    def ref_kv(self, index: int, block, identity: str, device, dtype):
        refs = self.conditioning.ref_features
        layers = self.adapters.ref_layers
        if refs is None or layers is None or str(index) not in layers:
            return None
        key = (index, identity)
        if key not in self._ref:
            layer = layers[str(index)]
            with torch.no_grad(), borrow_to_device(layer, device):
                feats = refs[identity][index].to(device=device, dtype=next(layer.parameters()).dtype)
                k, v = layer.key_value(feats, block.self_attn.norm_k)
            self._ref[key] = (k.to(dtype), v.to(dtype))
        return self._ref[key]

    def clear(self) -> None:
        self._ip.clear()
        self._ref.clear()


def _stack(parts: list):
    if any(p is None for p in parts):
        return None
    if all(p is parts[0] for p in parts):
        return parts[0]
    return tuple(torch.cat([p[j] for p in parts], dim=0) for j in range(2))


class LynxPatch:
    """Adapter inputs for every block of a generation; ``active`` implements the start/end window."""

    def __init__(self, adapters, conditioning: LynxConditioning, ip_scale: float = 1.0, ref_scale: float = 1.0):
        self.adapters = adapters
        self.conditioning = conditioning
        self.cache = AdapterKVCache(adapters, conditioning)
        self.ip_scale = float(ip_scale)
        self.ref_scale = float(ref_scale)
        self.active = True

    @property
    def has_reference(self) -> bool:
        return self.conditioning.ref_features is not None and self.adapters.ref_layers is not None

    def block_inputs(self, index: int, block, identities: Sequence[str], device, dtype) -> BlockAdapterInputs | None:
        """Per-row (K, V) for one block; ``identities`` gives COND/UNCOND for each batch row."""
        if not self.active:
            return None
        ip = ref = None
        if self.ip_scale != 0.0:
            ip = _stack([self.cache.ip_kv(index, block, i, device, dtype) for i in identities])
        if self.ref_scale != 0.0 and self.has_reference:
            ref = _stack([self.cache.ref_kv(index, block, i, device, dtype) for i in identities])
        if ip is None and ref is None:
            return None
        return BlockAdapterInputs(ip=ip, ref=ref, ip_scale=self.ip_scale, ref_scale=self.ref_scale)

    def release(self) -> None:
        self.cache.clear()
