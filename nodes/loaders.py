"""LoadLynxAdapters: the adapter weights from the ``lynx`` model folder."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lynx_core.adapters import OFFICIAL_FILES, LynxAdapterError, load_adapters
from lynx_core.adapters.io import adapter_file_parts
from lynx_core.adapters.keys import detect_variant

from . import comfy_env
from .payloads import LYNX_ADAPTERS, AdaptersHandle

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NONE = "none"
# ComfyUI-WanVideoWrapper users keep the re-published Lynx files among the diffusion models
# (e.g. diffusion_models/Lynx/...). Those entries are listed as "diffusion_models/<path>".
DIFFUSION_MODELS = "diffusion_models"


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


def resolve_entry(entry: str, input_name: str) -> Path:
    """Full path of a list entry: in the lynx folders, or ``diffusion_models/<path>`` in ComfyUI's
    diffusion_models folders; the error names the input and both places."""
    try:
        return comfy_env.resolve_lynx(entry, input_name)
    except FileNotFoundError:
        head, _, rest = entry.partition("/")
        if head == DIFFUSION_MODELS and rest:
            for root in comfy_env.model_dirs(DIFFUSION_MODELS):
                if (root / rest).exists():
                    return root / rest
        raise FileNotFoundError(
            f"{input_name}: '{entry}' was not found in the lynx model folders "
            f"({', '.join(str(p) for p in comfy_env.model_dirs('lynx')) or 'models/lynx (missing)'}) nor in "
            f"diffusion_models ({', '.join(str(p) for p in comfy_env.model_dirs(DIFFUSION_MODELS)) or 'none'}). "
            "Put the official lynx_full/ or lynx_lite/ folder or the re-published .safetensors files in one of them "
            "and refresh the page (R) so the list updates.") from None


def adapter_sources(adapters: str, ref_layers: str = NONE, resampler: str = NONE,
                    announce: bool = False) -> list[Path] | Path:
    """What to hand ``load_adapters``: a variant folder alone, or a list of files.

    An ID-layers file without a resampler (re-published split files) gets its partners from beside
    it (:func:`paired_files`); explicit ``ref_layers`` / ``resampler`` choices win."""
    main = resolve_entry(adapters, "adapters")
    extras = [resolve_entry(v, name) for name, v in (("ref_layers", ref_layers), ("resampler", resampler))
              if v and v != NONE]
    if main.is_file():
        paired = paired_files(main, pair_ref=ref_layers in (None, "", NONE), pair_resampler=resampler in (None, "", NONE))
        if paired and announce:
            log.info("Load Lynx Adapters: %s has no resampler; using %s from beside it (choose ref_layers / "
                     "resampler to override)", main.name, " and ".join(p.name for p in paired))
        extras = paired + extras
    if not extras:
        return main
    files = [p for p in (main / n for n in OFFICIAL_FILES.values()) if p.is_file()] if main.is_dir() else [main]
    for p in extras:
        if p.is_dir():
            raise ValueError(f"{p.name}: pick a .safetensors file here, not a folder")
        if p not in files:
            files.append(p)
    return files


# ------------------------------------------------------------------------- partners beside a file
_VARIANT_WORD = re.compile(r"(?<![a-z])(full|lite)(?![a-z])")


def _variant_word(name: str) -> str | None:
    """'full' / 'lite' when a file name says so (``..._Lynx_full_ip_layers``, ``lynx_lite_resampler``)."""
    words = set(_VARIANT_WORD.findall(name.lower().replace("_", " ").replace("-", " ")))
    return words.pop() if len(words) == 1 else None


def file_variant(path: Path) -> str:
    """full / lite of an adapter file, from its key names (as the loader decides)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return detect_variant(list(f.keys()))


def _partner(main: Path, part: str, variant: str) -> Path | None:
    """The one file beside ``main`` holding ``part`` for ``variant``: the name with ``ip_layers``
    replaced (``..._ref_layers...`` / ``..._resampler...``) first, else the only candidate whose name
    names the variant (or names none)."""
    quiet = _in_diffusion_models(main)
    candidates = []
    for p in sorted(main.parent.iterdir()):
        if p == main or p.suffix != ".safetensors" or p.name.startswith(".") or not p.is_file():
            continue
        parts = file_parts(p, quiet=quiet)
        if not parts or part not in parts or "ip" in parts:
            continue
        if _variant_word(p.name) not in (None, variant):
            continue
        candidates.append(p)
    target = {"ref": "ref_layers", "resampler": "resampler"}[part]
    wanted = re.sub("ip_layers", target, main.name, flags=re.IGNORECASE).lower()
    for p in candidates:
        if p.name.lower() == wanted:
            return p
    named = [p for p in candidates if _variant_word(p.name) == variant]
    pick = named if named else candidates
    if len(pick) == 1:
        return pick[0]
    if len(pick) > 1:
        log.info("Load Lynx Adapters: several %s files lie beside %s (%s); choose one in the %s input",
                 target, main.name, ", ".join(p.name for p in pick), target)
    return None


def paired_files(main: Path, pair_ref: bool = True, pair_resampler: bool = True) -> list[Path]:
    """Resampler (and, for full, Ref-layers) files beside an ID-layers file that has no resampler.

    Only files that could not load alone are paired, so every choice that loaded before loads the
    same files now: a file with its own resampler, or with an explicit resampler, gets nothing."""
    parts = file_parts(main, quiet=_in_diffusion_models(main))
    if not parts or "ip" not in parts or "resampler" in parts or not pair_resampler:
        return []
    try:
        variant = file_variant(main)
    except Exception:  # unreadable: load_adapters gives the precise error
        return []
    resampler = _partner(main, "resampler", variant)
    if resampler is None:
        return []
    out = [resampler]
    if pair_ref and variant == "full" and "ref" not in parts:
        ref = _partner(main, "ref", variant)
        if ref is not None:
            out.append(ref)
    return out


# ------------------------------------------------------------------------- what the lists offer
_VARIANT_FOLDER_FILES = {OFFICIAL_FILES["resampler"], OFFICIAL_FILES["ip_layers"]}
# path -> ((size, mtime_ns), parts or None): headers are read once per version of a file.
_PARTS_CACHE: dict[str, tuple[tuple[int, int], frozenset[str] | None]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def file_parts(path: Path, quiet: bool = False) -> frozenset[str] | None:
    """Adapter parts ("resampler", "ip", "ref") in ``path`` from its header, or None when it is not a
    loadable Lynx adapter file (that is logged once per version of the file; ``quiet``: only for
    files named like Lynx files, since diffusion_models mostly holds Wan checkpoints)."""
    key, stamp = str(path), _stamp(path)
    hit = _PARTS_CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        parts: frozenset[str] | None = adapter_file_parts(path)
    except (LynxAdapterError, OSError) as exc:
        if not quiet or "lynx" in path.name.lower():
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


def _in_diffusion_models(path: Path) -> bool:
    return any(_is_within(path, root) for root in comfy_env.model_dirs(DIFFUSION_MODELS))


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _walk(out: AdapterChoices, root: Path, prefix: str, quiet: bool) -> None:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        variant_folder = rel != Path(".") and _VARIANT_FOLDER_FILES <= set(filenames)
        if variant_folder:
            out.adapters.add(prefix + rel.as_posix())
        for name in filenames:
            if not name.endswith(".safetensors") or name.startswith("."):
                continue
            parts = file_parts(Path(dirpath) / name, quiet=quiet)
            if not parts:
                continue
            entry = prefix + (rel / name).as_posix()
            if "ip" in parts and not variant_folder:
                out.adapters.add(entry)
            if "ref" in parts:
                out.ref_layers.add(entry)
            if "resampler" in parts:
                out.resampler.add(entry)


def adapter_choices() -> AdapterChoices:
    """Only what each input can load: ``adapters`` gets variant folders and files holding ID-adapter
    layers outside them (combined or split re-published files); ``ref_layers`` / ``resampler`` get the
    files holding Ref-adapter / resampler keys (those inside variant folders too, for mixes).

    Searched: the lynx folders, then ComfyUI's diffusion_models folders (entries ``diffusion_models/...``;
    Wan checkpoints there are skipped without a warning)."""
    out = AdapterChoices()
    for root in comfy_env.model_dirs("lynx"):
        _walk(out, root, "", quiet=False)
    for root in comfy_env.model_dirs(DIFFUSION_MODELS):
        _walk(out, root, DIFFUSION_MODELS + "/", quiet=True)
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
                   "models/lynx or models/diffusion_models: the official lynx_full / lynx_lite folders or the "
                   "re-published files (split files found beside each other are paired automatically).")
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
                               "[+ ref_layers].safetensors) or a .safetensors file holding the ID-adapter, from "
                               "models/lynx (and extra_model_paths 'lynx') or models/diffusion_models (listed as "
                               "diffusion_models/...). Only loadable entries are listed. A split ID-layers file "
                               "without a resampler gets the resampler and Ref-layers files lying beside it "
                               "(matched by name) unless ref_layers / resampler are chosen."}),
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
        source = adapter_sources(adapters, ref_layers, resampler, announce=True)
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
