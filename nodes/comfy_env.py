"""Where the pack meets ComfyUI's globals: model folders, sampler/scheduler lists, lazy imports.

Everything ComfyUI-specific is imported inside functions, so ``import nodes`` works without
ComfyUI (CI, the engine's own tests); INPUT_TYPES then fall back to static lists.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Model folders of this pack (name -> subfolder of ComfyUI's models dir).
MODEL_FOLDERS = {"lynx": "lynx", "insightface": "insightface", "facexlib": "facexlib"}
_EXTS = {".safetensors", ".onnx", ".pth"}

# Used only when ComfyUI is absent (schema checks); inside ComfyUI the live lists are used.
FALLBACK_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "uni_pc", "uni_pc_bh2", "ddim"]
FALLBACK_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]
OFFICIAL_SCHEDULER = "lynx_official"


def have_comfy() -> bool:
    try:
        import comfy.samplers  # noqa: F401
        import folder_paths  # noqa: F401
    except Exception:  # ImportError, or a half-importable tree outside ComfyUI
        return False
    return True


def register_model_folders() -> None:
    """Add models/lynx, models/insightface, models/facexlib to ComfyUI's folder registry.

    Paths that extra_model_paths.yaml already added for these names are kept (ours is appended).
    """
    try:
        import folder_paths
    except ImportError:
        return
    for name, sub in MODEL_FOLDERS.items():
        default = os.path.join(folder_paths.models_dir, sub)
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            folder_paths.folder_names_and_paths[name] = ([default], set(_EXTS))
            continue
        paths, exts = entry
        if default not in paths:
            paths.append(default)
        if isinstance(exts, set):
            exts.update(_EXTS)


def model_dirs(name: str) -> list[Path]:
    """Every folder registered for ``name`` (ours and extra_model_paths), existing ones only."""
    try:
        import folder_paths
    except ImportError:
        return []
    try:
        return [Path(p) for p in folder_paths.get_folder_paths(name) if os.path.isdir(p)]
    except KeyError:
        return []


def models_root_dirs() -> list[Path]:
    """ComfyUI's models dir plus the parents of any registered insightface/facexlib folders
    (the face engine looks for ``<root>/insightface/models/<pack>`` and ``<root>/facexlib``)."""
    roots: list[Path] = []
    try:
        import folder_paths

        roots.append(Path(folder_paths.models_dir))
    except ImportError:
        pass
    for name in ("insightface", "facexlib"):
        for d in model_dirs(name):
            if d.parent not in roots:
                roots.append(d.parent)
    return roots


def resolve_lynx(entry: str, input_name: str) -> Path:
    """Full path of a lynx folder entry; the error names the input and where to put files."""
    for root in model_dirs("lynx"):
        candidate = (root / entry)
        if candidate.exists():
            return candidate
    searched = ", ".join(str(p) for p in model_dirs("lynx")) or "models/lynx (missing)"
    raise FileNotFoundError(
        f"{input_name}: '{entry}' was not found in the lynx model folders ({searched}). Put the "
        "official lynx_full/ or lynx_lite/ folder, or the combined .safetensors files, under models/lynx "
        "and refresh the page (R) so the list updates.")


def sampler_names() -> list[str]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS)
    except Exception:
        return list(FALLBACK_SAMPLERS)


def scheduler_names() -> list[str]:
    try:
        import comfy.samplers

        return [OFFICIAL_SCHEDULER] + list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:
        return [OFFICIAL_SCHEDULER] + list(FALLBACK_SCHEDULERS)


def output_directory() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def temp_directory() -> Path:
    import folder_paths

    return Path(folder_paths.get_temp_directory())


def interrupt_requested() -> bool:
    try:
        import comfy.model_management

        return bool(comfy.model_management.processing_interrupted())
    except Exception:
        return False


def throw_if_interrupted() -> None:
    try:
        import comfy.model_management
    except ImportError:
        return
    comfy.model_management.throw_exception_if_processing_interrupted()
