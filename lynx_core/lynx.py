"""Per-generation Lynx state: identity tokens, reference features and the cached adapter keys/values.

The adapters' keys and values depend only on the face, never on the step, so each block's
``to_k_ip/to_v_ip`` and ``to_k_ref/to_v_ref`` run once per generation and identity. ``precompute``
does that before the denoising steps, streaming one adapter layer at a time to the device, so the
4+ GB of adapter weights never need to be on the GPU: only the cached keys/values are (about
0.25-0.5 GB at 14B). Entries missing at a step are computed on first use, as a fallback.

The cache keeps the unscaled keys/values; the block gets values already multiplied by the current
adapter scale (``attention(q, k, s·v) = s·attention(q, k, v)``), cached per scale value, so a
constant scale multiplies once per generation and the block adds the branch without a multiply.
Block subsets (``ip_blocks`` / ``ref_blocks``) and per-step scale schedules (``lynx_core.controls``)
decide per block and step whether a branch runs at all; a block outside a subset runs without it.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .block import BlockAdapterInputs
from .controls import Schedule, as_schedule, block_subset, scheduled
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
    _scaled: dict = field(default_factory=dict)  # (kind, block, identity) -> (scale, unscaled, scaled)

    def ip_kv(self, index: int, block, identity: str, device, dtype):
        key = (index, identity)
        if not _fits(self._ip, key, device, dtype):
            name = _layer_name(index)
            layer = self.adapters.ip_layers[name] if name in self.adapters.ip_layers else None
            if layer is None:
                self._ip[key] = None
            else:
                tokens = self.conditioning.id_tokens[identity]
                self._ip[key] = self._key_value(layer, tokens, block.cross_attn.norm_k, device, dtype)
        return self._ip[key]

    def ref_kv(self, index: int, block, identity: str, device, dtype):
        refs = self.conditioning.ref_features
        layers = self.adapters.ref_layers
        if refs is None or layers is None or _layer_name(index) not in layers:
            return None
        key = (index, identity)
        if not _fits(self._ref, key, device, dtype):
            self._ref[key] = self._key_value(layers[_layer_name(index)], refs[identity][index],
                                             block.self_attn.norm_k, device, dtype)
        return self._ref[key]

    def scaled(self, kind: str, index: int, identity: str, kv, scale: float):
        """``kv`` with its values multiplied by ``scale``; one copy per entry, kept while the scale
        (and the unscaled entry it came from) stays the same. Scale 1.0 returns ``kv`` itself."""
        if kv is None or scale == 1.0:
            return kv
        key = (kind, index, identity)
        hit = self._scaled.get(key)
        if hit is not None and hit[0] == scale and _same_entry(hit[1], kv):
            return hit[2]
        k, v = kv
        out = (k, v * scale)
        self._scaled[key] = (scale, kv, out)
        return out

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
                   device, dtype: torch.dtype, ip: bool = True, ref: bool = True,
                   ip_blocks: frozenset[int] | None = None, ref_blocks: frozenset[int] | None = None,
                   ip_scale: float = 1.0, ref_scale: float = 1.0) -> int:
        """Fill the keys/values of every block for ``identities`` before the steps; returns :meth:`nbytes`.

        ``blocks`` are the DiT's blocks (their ``self_attn.norm_k`` / ``cross_attn.norm_k`` norm the
        keys); ``ip`` / ``ref`` select the ID- and Ref-adapter parts, ``ip_blocks`` / ``ref_blocks``
        (None = all) the blocks, and the values are also scaled for ``ip_scale`` / ``ref_scale``.
        """
        for ident in identities:
            if ident not in IDENTITIES:
                raise ValueError(f"identity {ident!r} is unknown; use {IDENTITIES}")
        # A first scale of 0 (a schedule that starts off) makes no scaled copy: that step skips the branch.
        ip_scale = ip_scale or 1.0
        ref_scale = ref_scale or 1.0
        for index, block in enumerate(blocks):
            for ident in identities:
                if ip and (ip_blocks is None or index in ip_blocks):
                    self.scaled("ip", index, ident, self.ip_kv(index, block, ident, device, dtype), ip_scale)
                if ref and (ref_blocks is None or index in ref_blocks):
                    self.scaled("ref", index, ident, self.ref_kv(index, block, ident, device, dtype), ref_scale)
        return self.nbytes()

    def nbytes(self) -> int:
        """Bytes of the cached keys/values (what they occupy on their device), scaled copies included."""
        entries = [*self._ip.values(), *self._ref.values(), *(hit[2][1:] for hit in self._scaled.values())]
        return sum(t.numel() * t.element_size() for entry in entries if entry is not None for t in entry)

    def clear(self) -> None:
        self._ip.clear()
        self._ref.clear()
        self._scaled.clear()


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


# Adapter layer names by block index, looked up instead of str(index): under torch.compile
# (ComfyUI's TorchCompileModel) a block index can be a symbolic int, and str() of one is a graph break.
_LAYER_NAMES = tuple(str(i) for i in range(256))


def _layer_name(index: int) -> str:
    return _LAYER_NAMES[index] if 0 <= index < len(_LAYER_NAMES) else str(index)


def _same_entry(a: tuple, b: tuple) -> bool:
    # Identity of the (K, V) tensors, not of the tuples: torch.compile (ComfyUI's TorchCompileModel)
    # traces this per block and cannot trace `is` between tuples without a graph break.
    return a[0] is b[0] and a[1] is b[1]


def _stack(parts: list):
    if any(p is None for p in parts):
        return None
    if all(_same_entry(p, parts[0]) for p in parts):
        return parts[0]
    return tuple(torch.cat([p[j] for p in parts], dim=0) for j in range(2))


class LynxPatch:
    """Adapter inputs for every block of a generation.

    ``active`` implements the start/end window (off: no block gets adapter inputs). ``ip_blocks`` /
    ``ref_blocks`` restrict a branch to a block subset (None = every block; text as in
    ``lynx_core.controls``); ``ip_scale_schedule`` / ``ref_scale_schedule`` replace the constant
    scales per step once :meth:`set_step` has told the patch which step runs.
    """

    def __init__(self, adapters, conditioning: LynxConditioning, ip_scale: float = 1.0, ref_scale: float = 1.0,
                 norm_moves_itself: Callable[[nn.Module], bool] | None = None, *,
                 ip_blocks=None, ref_blocks=None, ip_scale_schedule=None, ref_scale_schedule=None):
        self.adapters = adapters
        self.conditioning = conditioning
        self.cache = AdapterKVCache(adapters, conditioning, norm_moves_itself=norm_moves_itself)
        self.ip_scale = float(ip_scale)
        self.ref_scale = float(ref_scale)
        self.ip_blocks = ip_blocks
        self.ref_blocks = ref_blocks
        self.ip_scale_schedule = ip_scale_schedule
        self.ref_scale_schedule = ref_scale_schedule
        self.active = True
        self.step: tuple[int, int] | None = None  # (step index, total steps) of the running step

    # Subsets and schedules are parsed when set, so a bad one fails before any work.
    @property
    def ip_blocks(self) -> frozenset[int] | None:
        return self._ip_blocks

    @ip_blocks.setter
    def ip_blocks(self, value) -> None:
        self._ip_blocks = block_subset(value, self._num_blocks() if value is not None else 0, "ip_blocks")

    @property
    def ref_blocks(self) -> frozenset[int] | None:
        return self._ref_blocks

    @ref_blocks.setter
    def ref_blocks(self, value) -> None:
        self._ref_blocks = block_subset(value, self._num_blocks() if value is not None else 0, "ref_blocks")

    @property
    def ip_scale_schedule(self) -> Schedule | None:
        return self._ip_schedule

    @ip_scale_schedule.setter
    def ip_scale_schedule(self, value) -> None:
        self._ip_schedule = as_schedule(value, "ip_scale_schedule")

    @property
    def ref_scale_schedule(self) -> Schedule | None:
        return self._ref_schedule

    @ref_scale_schedule.setter
    def ref_scale_schedule(self, value) -> None:
        self._ref_schedule = as_schedule(value, "ref_scale_schedule")

    def _num_blocks(self) -> int:
        n = getattr(self.adapters, "num_blocks", None)
        if n is None:
            layers = [int(k) for part in (self.adapters.ip_layers, self.adapters.ref_layers or {}) for k in part]
            n = max(layers) + 1 if layers else 0
        return int(n)

    @property
    def has_reference(self) -> bool:
        return self.conditioning.ref_features is not None and self.adapters.ref_layers is not None

    def check_steps(self, total_steps: int) -> None:
        """Per-step scale lists must have one value per step (raises ValueError naming the input)."""
        for schedule in (self._ip_schedule, self._ref_schedule):
            if schedule is not None:
                schedule.check_steps(total_steps)

    def set_step(self, step_index: int | None, total_steps: int | None) -> None:
        """The step that runs next (None: unknown, the constant scales apply)."""
        if step_index is None or total_steps is None:
            self.step = None
            return
        self.check_steps(total_steps)
        self.step = (int(step_index), int(total_steps))

    def current_scales(self) -> tuple[float, float]:
        """(ip_scale, ref_scale) of the running step."""
        k, n = self.step if self.step is not None else (None, None)
        return (scheduled(self._ip_schedule, self.ip_scale, k, n),
                scheduled(self._ref_schedule, self.ref_scale, k, n))

    def _first_scales(self) -> tuple[float, float]:
        """The scales of the first step (what precompute scales the values for)."""
        if self.step is not None:
            return self.current_scales()
        return (self._ip_schedule.first if self._ip_schedule is not None else self.ip_scale,
                self._ref_schedule.first if self._ref_schedule is not None else self.ref_scale)

    def _uses(self, constant: float, schedule: Schedule | None, blocks: frozenset[int] | None) -> bool:
        """Whether a branch can run at any step (some non-zero scale on some block)."""
        if blocks is not None and not blocks:
            return False
        return any(v != 0.0 for v in schedule.values) if schedule is not None else constant != 0.0

    def block_inputs(self, index: int, block, identities: Sequence[str], device, dtype) -> BlockAdapterInputs | None:
        """Per-row (K, scale·V) for one block; ``identities`` gives COND/UNCOND for each batch row.

        None when no branch runs on this block at this step (outside the window or the subsets, or
        zero scales): the caller then runs the plain Wan block.
        """
        if not self.active:
            return None
        ip_scale, ref_scale = self.current_scales()
        ip = ref = None
        if ip_scale != 0.0 and (self._ip_blocks is None or index in self._ip_blocks):
            ip = _stack([self.cache.scaled("ip", index, i, self.cache.ip_kv(index, block, i, device, dtype), ip_scale)
                         for i in identities])
        if ref_scale != 0.0 and self.has_reference and (self._ref_blocks is None or index in self._ref_blocks):
            ref = _stack([self.cache.scaled("ref", index, i, self.cache.ref_kv(index, block, i, device, dtype),
                                            ref_scale) for i in identities])
        if ip is None and ref is None:
            return None
        # The scales are folded into the values: the block adds the branches as they are.
        return BlockAdapterInputs(ip=ip, ref=ref, ip_scale=1.0, ref_scale=1.0)

    def precompute(self, blocks: Sequence[nn.Module], device, dtype: torch.dtype,
                   identities: Sequence[str] = IDENTITIES) -> int:
        """Compute every key/value the steps will use (branches that never run and blocks outside the
        subsets are skipped) on ``device`` in ``dtype``, the dtype of the blocks' hidden states, with
        the values scaled for the first step. Returns the cached bytes."""
        ip_scale, ref_scale = self._first_scales()
        nbytes = self.cache.precompute(
            blocks, identities, device=device, dtype=dtype,
            ip=self._uses(self.ip_scale, self._ip_schedule, self._ip_blocks),
            ref=self.has_reference and self._uses(self.ref_scale, self._ref_schedule, self._ref_blocks),
            ip_blocks=self._ip_blocks, ref_blocks=self._ref_blocks, ip_scale=ip_scale, ref_scale=ref_scale)
        log.info("Lynx: adapter keys/values precomputed for %d blocks x %d identities on %s: %.1f MB",
                 len(blocks), len(identities), device, nbytes / 2**20)
        return nbytes

    def release(self) -> None:
        self.cache.clear()
        self.step = None
