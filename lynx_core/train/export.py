"""Export trained adapters as a release: the official file layout, bf16, with training metadata.

The result loads with ``lynx_core.adapters.load_adapters`` and ComfyUI's LoadLynxAdapters like the
ByteDance files. An export goes to a hidden temporary folder (or file) next to its target, every
file is fsynced, and it is renamed at the end, so an interrupted export leaves nothing that looks
finished. An existing export is never overwritten.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import fsync_dir
from ..adapters import OFFICIAL_FILES, LynxAdapters, combined_state, official_state
from ..adapters.io import file_metadata as _adapter_metadata
from .lora import has_lora, merge_lora

logger = logging.getLogger(__name__)

METADATA_PREFIX = "lynx.training."
IF_EXISTS = ("error", "increment")
_MAX_INCREMENT = 9999


class ExportError(ValueError):
    """An export that cannot be written; the message says what to do."""


def _training_metadata(metadata: Optional[Mapping[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not key:
            raise ExportError(f"export metadata keys must be non-empty strings, got {key!r}")
        if isinstance(value, str):
            out[METADATA_PREFIX + key] = value
            continue
        try:
            out[METADATA_PREFIX + key] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError):
            raise ExportError(f"export metadata {key!r} must be a string, number, list or dict, got "
                              f"{type(value).__name__}") from None
    return out


def _is_free(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _next_free(path: Path, is_file: bool) -> Path:
    stem, suffix = (path.stem, path.suffix) if is_file else (path.name, "")
    for i in range(1, _MAX_INCREMENT + 1):
        candidate = path.with_name(f"{stem}_{i:03d}{suffix}")
        if _is_free(candidate):
            return candidate
    raise ExportError(f"{path}: {_MAX_INCREMENT} numbered exports exist already; choose another name")


def _resolve_target(out: Path, if_exists: str) -> Path:
    if if_exists not in IF_EXISTS:
        raise ExportError(f"if_exists must be one of {IF_EXISTS}, got {if_exists!r}")
    is_file = out.suffix == ".safetensors"
    if is_file and out.is_dir():
        raise ExportError(f"{out} is a folder; give a folder name without .safetensors for the official layout")
    if not is_file and out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder (official layout) or a .safetensors path (one combined file)")
    if _is_free(out):
        return out
    if if_exists == "increment":
        return _next_free(out, is_file)
    raise ExportError(
        f"{out} already exists{'' if is_file else ' and is not empty'}; exported adapters never overwrite "
        f"anything. Choose another output name (the next free one is {_next_free(out, is_file).name}), "
        f"delete the old export, or pass if_exists='increment'"
    )


def _cpu(tensors: Mapping[str, Tensor], dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    out = {}
    for key, t in tensors.items():
        if t.is_meta:
            raise ExportError(f"cannot export {key}: the adapters were built on the meta device and hold no data")
        t = t.detach().to("cpu")
        out[key] = (t.to(dtype) if dtype is not None else t).contiguous()
    return out


def _write(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as fh:
        os.fsync(fh.fileno())




def export_adapters(
    adapters: LynxAdapters,
    out: Union[str, Path],
    dtype: Optional[torch.dtype] = torch.bfloat16,
    metadata: Optional[Mapping[str, Any]] = None,
    if_exists: str = "error",
) -> Path:
    """Write ``adapters`` in a released layout and return where they went.

    ``out`` a folder -> the official layout (``resampler`` / ``ip_layers`` [/ ``ref_layers``]
    ``.safetensors``); ``out`` ending in ``.safetensors`` -> one file in the combined naming.
    Adapters still carrying a LoRA are merged first (the trained adapters are not changed).
    ``dtype`` defaults to bf16 (what the official code runs in); ``None`` keeps the training dtype.
    ``metadata`` (base_model, steps, dataset_fingerprint, mode, ...) is stored in every file's
    safetensors header under ``lynx.training.*``; read it back with ``read_export_metadata``.
    An existing non-empty target is an error (``if_exists='error'``) or, with ``'increment'``,
    the next free name ``out_001``, ``out_002`` ... is used.
    """
    out = Path(out).expanduser()
    extra = _training_metadata(metadata)
    target = _resolve_target(out, if_exists)
    if has_lora(adapters):
        logger.info("merging the LoRA into the adapter weights for export")
        adapters = merge_lora(adapters)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if target.suffix == ".safetensors":
            _write(_cpu(combined_state(adapters), dtype), tmp, {**_adapter_metadata(adapters, "combined"), **extra})
        else:
            tmp.mkdir()
            for part, tensors in official_state(adapters).items():
                _write(_cpu(tensors, dtype), tmp / OFFICIAL_FILES[part], {**_adapter_metadata(adapters, part), **extra})
            fsync_dir(tmp)
        if not _is_free(target):  # something else wrote there meanwhile
            raise ExportError(f"{target} appeared while exporting; it was left untouched, export again to another name")
        if target.is_dir():
            target.rmdir()  # an empty folder the user made for the export
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    logger.info("exported %s to %s", adapters.summary(), target)
    return target


def read_export_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The ``metadata`` given to ``export_adapters`` (as strings; non-strings were JSON-encoded)."""
    path = Path(path)
    file = path / OFFICIAL_FILES["ip_layers"] if path.is_dir() else path
    if not file.is_file():
        raise ExportError(f"{file} does not exist; pass an export folder or a combined .safetensors file")
    with safe_open(str(file), framework="pt") as fh:
        meta = fh.metadata() or {}
    return {k[len(METADATA_PREFIX):]: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)}
