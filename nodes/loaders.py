"""LoadLynxAdapters: the adapter weights from the ``lynx`` model folder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from lynx_core.adapters import OFFICIAL_FILES, load_adapters

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
        entries = comfy_env.lynx_entries()
        files = [e for e in entries if e.endswith(".safetensors")]
        return {
            "required": {
                "adapters": (entries, {"tooltip": "An official variant folder (lynx_full, lynx_lite: resampler + "
                                                  "ip_layers [+ ref_layers].safetensors) or a combined .safetensors "
                                                  "file, from models/lynx (and extra_model_paths 'lynx')."}),
                "dtype": (["auto", "bf16", "fp16", "fp32"], {"default": "auto",
                          "tooltip": "Compute dtype of the adapters. auto: bf16 where supported (the official "
                                     "dtype), fp16 on older GPUs, fp32 on the CPU."}),
            },
            "optional": {
                "ref_layers": ([NONE] + files, {"default": NONE,
                               "tooltip": "Extra file with the Ref-adapter layers, for re-published split files "
                                          "(e.g. ..._full_ref_layers_fp16.safetensors). none = not needed."}),
                "resampler": ([NONE] + files, {"default": NONE,
                              "tooltip": "Extra file with the resampler, for re-published split files "
                                         "(e.g. lynx_full_resampler_fp32.safetensors). none = not needed."}),
            },
        }

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
