"""Per-generation Lynx state: identity tokens, reference features and the cached adapter keys/values.

The adapters' keys and values depend only on the face, never on the step, so each block's
``to_k_ip/to_v_ip`` and ``to_k_ref/to_v_ref`` run once per generation and identity. ``precompute``
does that before the denoising steps, streaming one adapter layer at a time to the device, so the
4+ GB of adapter weights never need to be on the GPU: only the cached keys/values are (about
0.25-0.5 GB at 14B). Entries missing at a step are computed on first use, as a fallback.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

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
    """Adapter keys/values per (block, identity), on the device and in the dtype the blocks run in.

    :meth:`precompute` fills the whole cache before the denoising steps, streaming one adapter layer
    at a time to the device; :meth:`ip_kv` / :meth:`ref_kv` return cached entries and compute a
    missing (or differently placed) entry on first use, so a skipped precompute still works.
    ``norm_moves_itself(module)`` tells which block norms move their weights to the input's device
    on their own (ComfyUI's cast-on-forward layers); other norms whose weights are elsewhere are
    borrowed to the device for the call.
    """
    adapters: object
    conditioning: LynxConditioning
    norm_moves_itself: Callable[[nn.Module], bool] | None = None
    _ip: dict = field(default_factory=dict)
    _ref: dict = field(default_factory=dict)

    def ip_kv(self, index: int, block, identity: str, device, dtype):
        key = (index, identity)
        if not _fits(self._ip, key, device, dtype):
            layer = self.adapters.ip_layers[str(index)] if str(index) in self.adapters.ip_layers else None
            if layer is None:
                self._ip[key] = None
            else:
                tokens = self.conditioning.id_tokens[identity]
                self._ip[key] = self._key_value(layer, tokens, block.cross_attn.norm_k, device, dtype)
        return self._ip[key]

    def ref_kv(self, index: int, block, identity: str, device, dtype):
        refs = self.conditioning.ref_features
        layers = self.adapters.ref_layers
        if refs is None or layers is None or str(index) not in layers:
            return None
        key = (index, identity)
        if not _fits(self._ref, key, device, dtype):
            self._ref[key] = self._key_value(layers[str(index)], refs[identity][index],
                                             block.self_attn.norm_k, device, dtype)
        return self._ref[key]

    def _key_value(self, layer: nn.Module, inputs: torch.Tensor, norm_k, device, dtype):
        # The adapter layer is borrowed (host-to-device copies, dropped afterwards): its weights
        # never stay on the device and are never copied back to the host.
        with torch.no_grad(), borrow_to_device(layer, device), self._norm_on(norm_k, device) as norm:
            x = inputs.to(device=device, dtype=next(layer.parameters()).dtype)
            k, v = layer.key_value(x, norm)
        return k.to(dtype), v.to(dtype)

    @contextmanager
    def _norm_on(self, norm, device) -> Iterator:
        if (not isinstance(norm, nn.Module) or _all_on(norm, device)
                or (self.norm_moves_itself is not None and self.norm_moves_itself(norm))):
            yield norm
        else:
            with borrow_to_device(norm, device):
                yield norm

    def precompute(self, blocks: Sequence[nn.Module], identities: Sequence[str] = IDENTITIES, *,
                   device, dtype: torch.dtype, ip: bool = True, ref: bool = True) -> int:
        """Fill the keys/values of every block for ``identities`` before the steps; returns :meth:`nbytes`.

        ``blocks`` are the DiT's blocks (their ``self_attn.norm_k`` / ``cross_attn.norm_k`` norm the
        keys); ``ip`` / ``ref`` select the ID- and Ref-adapter parts.
        """
        for ident in identities:
            if ident not in IDENTITIES:
                raise ValueError(f"identity {ident!r} is unknown; use {IDENTITIES}")
        for index, block in enumerate(blocks):
            for ident in identities:
                if ip:
                    self.ip_kv(index, block, ident, device, dtype)
                if ref:
                    self.ref_kv(index, block, ident, device, dtype)
        return self.nbytes()

    def nbytes(self) -> int:
        """Bytes of the cached keys/values (what they occupy on their device)."""
        return sum(t.numel() * t.element_size()
                   for entry in (*self._ip.values(), *self._ref.values()) if entry is not None for t in entry)

    def clear(self) -> None:
        self._ip.clear()
        self._ref.clear()


def _same_device(t: torch.Tensor, device) -> bool:
    dev = torch.device(device)
    return t.device.type == dev.type and (dev.index is None or t.device.index == dev.index)


def _all_on(module: nn.Module, device) -> bool:
    return all(_same_device(t, device) for t in (*module.parameters(), *module.buffers()))


def _fits(store: dict, key, device, dtype) -> bool:
    """A cached entry that the block can use as is (None means 'no adapter on this block')."""
    if key not in store:
        return False
    entry = store[key]
    if entry is None or (entry[0].dtype == dtype and _same_device(entry[0], device)):
        return True
    log.info("Lynx: adapter keys/values of block %d (%s) were cached as %s on %s but the block runs in %s "
             "on %s; recomputing", key[0], key[1], entry[0].dtype, entry[0].device, dtype, device)
    return False


def _stack(parts: list):
    if any(p is None for p in parts):
        return None
    if all(p is parts[0] for p in parts):
        return parts[0]
    return tuple(torch.cat([p[j] for p in parts], dim=0) for j in range(2))


class LynxPatch:
    """Adapter inputs for every block of a generation; ``active`` implements the start/end window."""

    def __init__(self, adapters, conditioning: LynxConditioning, ip_scale: float = 1.0, ref_scale: float = 1.0,
                 norm_moves_itself: Callable[[nn.Module], bool] | None = None):
        self.adapters = adapters
        self.conditioning = conditioning
        self.cache = AdapterKVCache(adapters, conditioning, norm_moves_itself=norm_moves_itself)
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

    def precompute(self, blocks: Sequence[nn.Module], device, dtype: torch.dtype,
                   identities: Sequence[str] = IDENTITIES) -> int:
        """Compute every key/value the steps will use (scales of 0 skip their adapter) on ``device``
        in ``dtype``, the dtype of the blocks' hidden states. Returns the cached bytes."""
        nbytes = self.cache.precompute(blocks, identities, device=device, dtype=dtype,
                                       ip=self.ip_scale != 0.0, ref=self.ref_scale != 0.0 and self.has_reference)
        log.info("Lynx: adapter keys/values precomputed for %d blocks x %d identities on %s: %.1f MB",
                 len(blocks), len(identities), device, nbytes / 2**20)
        return nbytes

    def release(self) -> None:
        self.cache.clear()
