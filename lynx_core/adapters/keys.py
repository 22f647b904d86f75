"""Key naming of the adapter files, and maps between the two published layouts.

* official (ByteDance ``lynx_full/`` / ``lynx_lite/``): three files; ``ip_layers`` and ``ref_layers``
  are ModuleList state dicts (``{i}.to_k_ip.weight``...). In lite, list index i is block 2i.
* combined (re-published for original-Wan naming): ``blocks.{N}.cross_attn.ip_adapter.*`` and
  ``blocks.{N}.self_attn.ref_adapter.*`` with the real block index N, optionally behind a prefix
  such as ``diffusion_model.``; resampler keys bare or behind a prefix such as ``resampler.``.
  Wan2GP's module files name the same layers without the sub-module (its Lynx setup puts them
  straight on the attention modules): ``blocks.{N}.cross_attn.to_k_ip.*``,
  ``blocks.{N}.cross_attn.registers``, ``blocks.{N}.self_attn.to_k_ref.*``; they are read as the
  combined layout (real block index).

Internally (``LynxAdapters.state_dict()``) the names are ``resampler.*``, ``ip_layers.{N}.*`` and
``ref_layers.{N}.*`` with the real block index N.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, TypeVar

from .errors import LynxAdapterError

T = TypeVar("T")

OFFICIAL_FILES = {
    "resampler": "resampler.safetensors",
    "ip_layers": "ip_layers.safetensors",
    "ref_layers": "ref_layers.safetensors",
}

_IP_REST = r"to_k_ip\.(?:weight|bias)|to_v_ip\.(?:weight|bias)|registers"
_REF_REST = r"to_k_ref\.(?:weight|bias)|to_v_ref\.(?:weight|bias)"
_RESAMPLER_REST = (
    r"latents|proj_in\.(?:weight|bias)|proj_out\.(?:weight|bias)|norm_out\.(?:weight|bias)"
    r"|layers\.\d+\.0\.(?:norm1|norm2)\.(?:weight|bias)|layers\.\d+\.0\.(?:to_q|to_kv|to_out)\.weight"
    r"|layers\.\d+\.1\.0\.(?:weight|bias)|layers\.\d+\.1\.[13]\.weight"
)

# ``ip_adapter.`` / ``ref_adapter.`` are optional: Kijai's files have them, Wan2GP's do not.
_COMBINED_RE = re.compile(
    rf"^(?P<prefix>(?:.*?\.)?)blocks\.(?P<block>\d+)\."
    rf"(?:cross_attn\.(?:ip_adapter\.)?(?P<ip>{_IP_REST})|self_attn\.(?:ref_adapter\.)?(?P<ref>{_REF_REST}))$"
)
_OFFICIAL_IP_RE = re.compile(rf"^(?P<index>\d+)\.(?P<rest>{_IP_REST})$")
_OFFICIAL_REF_RE = re.compile(rf"^(?P<index>\d+)\.(?P<rest>{_REF_REST})$")
_RESAMPLER_RE = re.compile(rf"^(?P<prefix>(?:.*?\.)?)(?P<rest>{_RESAMPLER_REST})$")


@dataclass(frozen=True)
class KeyInfo:
    """What one stored key is: ``part`` in {resampler, ip, ref}; ``style`` official or combined."""

    part: str
    style: str
    index: Optional[int]  # list index (official) or block index (combined); None for resampler
    rest: str  # the name inside the layer / resampler
    prefix: str = ""  # what stood before the standard name (e.g. "resampler.", "diffusion_model.")


def classify_key(key: str) -> Optional[KeyInfo]:
    """Return what ``key`` is, or None when it belongs to no Lynx adapter layout."""
    m = _OFFICIAL_IP_RE.match(key)
    if m:
        return KeyInfo("ip", "official", int(m["index"]), m["rest"])
    m = _OFFICIAL_REF_RE.match(key)
    if m:
        return KeyInfo("ref", "official", int(m["index"]), m["rest"])
    m = _COMBINED_RE.match(key)
    if m:
        part = "ip" if m["ip"] is not None else "ref"
        return KeyInfo(part, "combined", int(m["block"]), m["ip"] or m["ref"], m["prefix"])
    m = _RESAMPLER_RE.match(key)
    if m:
        return KeyInfo("resampler", "any", None, m["rest"], m["prefix"])
    return None


def detect_variant(keys: Iterable[str]) -> str:
    """``'full'`` or ``'lite'`` from key names alone (official, combined or internal names).

    The ID layers decide: registers or biases mean full, weight-only ID layers mean lite. Without
    ID layers, Ref layers mean full (only the full release has them).
    """
    ip_rests: set[str] = set()
    has_ref = False
    for key in keys:
        info = classify_key(_internal_to_combined_name(key))
        if info is None:
            continue
        if info.part == "ip":
            ip_rests.add(info.rest)
        elif info.part == "ref":
            has_ref = True
    if ip_rests:
        if "registers" in ip_rests or any(r.endswith(".bias") for r in ip_rests):
            return "full"
        return "lite"
    if has_ref:
        return "full"
    raise LynxAdapterError(
        "no Lynx ID-adapter or Ref-adapter keys found (expected e.g. '0.to_k_ip.weight' or "
        "'blocks.0.cross_attn.ip_adapter.to_k_ip.weight'); this is not a Lynx adapter file"
    )


def _internal_to_combined_name(key: str) -> str:
    # Lets detect_variant accept LynxAdapters.state_dict() names too.
    m = re.match(r"^(ip_layers|ref_layers)\.(\d+)\.(.+)$", key)
    if not m:
        return key
    kind = "cross_attn.ip_adapter" if m[1] == "ip_layers" else "self_attn.ref_adapter"
    return f"blocks.{m[2]}.{kind}.{m[3]}"


def ip_every(variant: str) -> int:
    return 2 if variant == "lite" else 1


def official_index_to_block(index: int, variant: str) -> int:
    return index * ip_every(variant)


def block_to_official_index(block: int, variant: str) -> int:
    step = ip_every(variant)
    if block % step:
        raise LynxAdapterError(
            f"block {block} has an ID layer, but lite ID layers sit only on every 2nd block (0, 2, 4, ...)"
        )
    return block // step


def internal_key(info: KeyInfo, variant: str) -> str:
    """The ``LynxAdapters.state_dict()`` name of a classified stored key."""
    if info.part == "resampler":
        return f"resampler.{info.rest}"
    block = info.index if info.style == "combined" else None
    if info.part == "ip":
        if block is None:
            block = official_index_to_block(info.index, variant)
        return f"ip_layers.{block}.{info.rest}"
    return f"ref_layers.{info.index}.{info.rest}"


def official_to_combined(state: Mapping[str, Mapping[str, T]], variant: str) -> dict[str, T]:
    """``{'resampler': sd, 'ip_layers': sd, 'ref_layers': sd}`` (any may be absent) -> one combined dict.

    Resampler keys get the ``resampler.`` prefix; lite list index i becomes block 2i.
    """
    out: dict[str, T] = {}
    for key, value in state.get("resampler", {}).items():
        out[f"resampler.{key}"] = value
    for part, kind, regex in (
        ("ip_layers", "cross_attn.ip_adapter", _OFFICIAL_IP_RE),
        ("ref_layers", "self_attn.ref_adapter", _OFFICIAL_REF_RE),
    ):
        for key, value in state.get(part, {}).items():
            m = regex.match(key)
            if not m:
                raise LynxAdapterError(f"{OFFICIAL_FILES[part]}: key {key!r} is not an official Lynx {part} key")
            idx = int(m["index"])
            block = official_index_to_block(idx, variant) if part == "ip_layers" else idx
            out[f"blocks.{block}.{kind}.{m['rest']}"] = value
    return out


def combined_to_official(state: Mapping[str, T], variant: Optional[str] = None) -> dict[str, dict[str, T]]:
    """One combined dict -> ``{'resampler': ..., 'ip_layers': ..., 'ref_layers': ...}`` (empty parts left out)."""
    variant = variant or detect_variant(state.keys())
    out: dict[str, dict[str, T]] = {"resampler": {}, "ip_layers": {}, "ref_layers": {}}
    for key, value in state.items():
        info = classify_key(key)
        if info is None or info.style == "official":
            raise LynxAdapterError(f"key {key!r} is not a combined-layout Lynx adapter key")
        if info.part == "resampler":
            out["resampler"][info.rest] = value
        elif info.part == "ip":
            out["ip_layers"][f"{block_to_official_index(info.index, variant)}.{info.rest}"] = value
        else:
            out["ref_layers"][f"{info.index}.{info.rest}"] = value
    return {k: v for k, v in out.items() if v}
