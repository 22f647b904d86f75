"""LoadLynxAdapters: the adapter weights from the ``lynx`` model folder."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lynx_core.adapters import OFFICIAL_FILES, LynxAdapterError, load_adapters
from lynx_core.adapters.io import adapter_file_parts

from . import comfy_env
from .payloads import LYNX_ADAPTERS, AdaptersHandle

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NONE = "none"


def auto_dtype() -> torch.dtype:
    """bf16 where the compute device supports it (the official dtype), else fp16 on GPUs, fp32 on CPU."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.float32
    device = mm.get_torch_device()
    if device.type == "cpu":
        return torch.float32
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


def resolve_dtype(choice: str) -> torch.dtype:
    if choice == "auto":
        return auto_dtype()
    if choice not in DTYPES:
        raise ValueError(f"dtype: unknown choice {choice!r}; use auto, bf16, fp16 or fp32")
    return DTYPES[choice]


def adapter_sources(adapters: str, ref_layers: str = NONE, resampler: str = NONE) -> list[Path] | Path:
    """What to hand ``load_adapters``: a variant folder alone, or a list of files."""
    main = comfy_env.resolve_lynx(adapters, "adapters")
    extras = [comfy_env.resolve_lynx(v, name) for name, v in (("ref_layers", ref_layers), ("resampler", resampler))
              if v and v != NONE]
    if not extras:
        return main
    files = [p for p in (main / n for n in OFFICIAL_FILES.values()) if p.is_file()] if main.is_dir() else [main]
    for p in extras:
        if p.is_dir():
            raise ValueError(f"{p.name}: pick a .safetensors file here, not a folder")
        if p not in files:
            files.append(p)
    return files


# ------------------------------------------------------------------------- what the lists offer
_VARIANT_FOLDER_FILES = {OFFICIAL_FILES["resampler"], OFFICIAL_FILES["ip_layers"]}
# path -> ((size, mtime_ns), parts or None): headers are read once per version of a file.
_PARTS_CACHE: dict[str, tuple[tuple[int, int], frozenset[str] | None]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def file_parts(path: Path) -> frozenset[str] | None:
    """Adapter parts ("resampler", "ip", "ref") in ``path`` from its header, or None when it is not a
    loadable Lynx adapter file (that is logged once per version of the file)."""
    key, stamp = str(path), _stamp(path)
    hit = _PARTS_CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        parts: frozenset[str] | None = adapter_file_parts(path)
    except (LynxAdapterError, OSError) as exc:
        log.warning("Load Lynx Adapters: %s is not offered in the lists: %s", path, exc)
        parts = None
    _PARTS_CACHE[key] = (stamp, parts)
    return parts


@dataclass
class AdapterChoices:
    """Entries of the loader's three lists, relative to the lynx model folders."""

    adapters: set[str] = field(default_factory=set)
    ref_layers: set[str] = field(default_factory=set)
    resampler: set[str] = field(default_factory=set)


def adapter_choices() -> AdapterChoices:
    """Only what each input can load: ``adapters`` gets variant folders and files holding ID-adapter
    layers outside them (combined or split re-published files); ``ref_layers`` / ``resampler`` get the
    files holding Ref-adapter / resampler keys (those inside variant folders too, for mixes)."""
    out = AdapterChoices()
    for root in comfy_env.model_dirs("lynx"):
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root)
            variant_folder = rel != Path(".") and _VARIANT_FOLDER_FILES <= set(filenames)
            if variant_folder:
                out.adapters.add(rel.as_posix())
            for name in filenames:
                if not name.endswith(".safetensors") or name.startswith("."):
                    continue
                parts = file_parts(Path(dirpath) / name)
                if not parts:
                    continue
                entry = (rel / name).as_posix()
                if "ip" in parts and not variant_folder:
                    out.adapters.add(entry)
                if "ref" in parts:
                    out.ref_layers.add(entry)
                if "resampler" in parts:
                    out.resampler.add(entry)
    return out


def source_stamp(source: list[Path] | Path) -> str:
    """Path, size and modification time of every file a load reads: changes when a file is replaced."""
    if isinstance(source, Path) and source.is_dir():
        files = sorted(p for p in (source / n for n in OFFICIAL_FILES.values()) if p.is_file())
    else:
        files = [source] if isinstance(source, Path) else list(source)
    parts = []
    for p in files:
        try:
            size, mtime = _stamp(p)
        except OSError:
            size, mtime = -1, -1
        parts.append(f"{p}:{size}:{mtime}")
    return "|".join(parts)


class LoadLynxAdapters:
    DESCRIPTION = ("Loads the Lynx adapters (Perceiver resampler, ID-adapter and, for full, Ref-adapter) from "
                   "models/lynx: the official lynx_full / lynx_lite folders or the combined re-published files.")
    CATEGORY = "Lynx/loaders"
    RETURN_TYPES = (LYNX_ADAPTERS,)
    RETURN_NAMES = ("adapters",)
    OUTPUT_TOOLTIPS = ("The adapters, for Lynx Encode Reference and Lynx Sampler / Lynx Guider.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = adapter_choices()
        return {
            "required": {
                "adapters": (sorted(choices.adapters), {
                    "tooltip": "An official variant folder (lynx_full, lynx_lite: resampler + ip_layers "
                               "[+ ref_layers].safetensors) or a combined .safetensors file holding the ID-adapter, "
                               "from models/lynx (and extra_model_paths 'lynx'). Only loadable entries are listed."}),
                "dtype": (["auto", "bf16", "fp16", "fp32"], {"default": "auto",
                          "tooltip": "Compute dtype of the adapters. auto: bf16 where supported (the official "
                                     "dtype), fp16 on older GPUs, fp32 on the CPU."}),
            },
            "optional": {
                "ref_layers": ([NONE] + sorted(choices.ref_layers), {"default": NONE,
                               "tooltip": "Extra file with the Ref-adapter layers, for re-published split files "
                                          "(e.g. ..._full_ref_layers_fp16.safetensors). none = not needed."}),
                "resampler": ([NONE] + sorted(choices.resampler), {"default": NONE,
                              "tooltip": "Extra file with the resampler, for re-published split files "
                                         "(e.g. lynx_full_resampler_fp32.safetensors). none = not needed."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, adapters, dtype="auto", ref_layers=NONE, resampler=NONE, **_):
        # ComfyUI re-runs the node when this value changes: replaced files (new size or mtime) reload
        # without a restart. Unresolvable entries give a constant; load() then raises the clear error.
        try:
            return f"{dtype}|{source_stamp(adapter_sources(adapters, ref_layers, resampler))}"
        except (OSError, ValueError):
            return f"unresolved|{adapters}|{ref_layers}|{resampler}"

    def load(self, adapters, dtype="auto", ref_layers=NONE, resampler=NONE):
        source = adapter_sources(adapters, ref_layers, resampler)
        torch_dtype = resolve_dtype(dtype)
        try:
            import comfy.model_management as mm

            device = mm.unet_offload_device()
        except ImportError:
            device = torch.device("cpu")
        loaded = load_adapters(source, dtype=torch_dtype, device=device)
        label = adapters if isinstance(source, Path) else " + ".join(p.name for p in source)
        log.info("Lynx adapters: %s", loaded.summary())
        return (AdaptersHandle(adapters=loaded, source=label),)
