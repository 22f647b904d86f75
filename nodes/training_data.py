"""The training dataset in the graph: ComfyUI's VAE and CLIP as the cache's encoders, report, preview.

Latent space. The cache holds what the DiT sees: ComfyUI's VAE returns the raw Wan latent, and a
Wan2.1 MODEL normalises it on the way in (``model.model.process_latent_in`` = the Wan21 latent
format's ``process_in``: (z - mean) / std per channel). The dataset node has no MODEL, so it applies
that same Wan21 ``process_in`` itself; the training target is therefore in the DiT's own space,
exactly as the standalone cache (diffusers' VAE plus the same normalisation) stores it.

Text. ComfyUI's UMT5 pads every prompt to 512 tokens with zeroed rows; the cache wants the
embedding trimmed to its real tokens (the trainer pads it back to the context length), so trailing
all-zero rows are dropped.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from lynx_core.train.cache import DataEncoders, TrainCache

log = logging.getLogger(__name__)

LYNX_DATASET = "LYNX_DATASET"
DATASETS_FOLDER = "lynx_datasets"
NO_DATASETS = "(no folders in input/lynx_datasets)"
PREVIEW_CELL = 160
PREVIEW_MAX_ROWS = 12


@dataclass
class TrainingDataset:
    """What travels on LYNX_DATASET: the built cache and a few words about it."""

    cache: TrainCache  # or any lynx_core.train.trainer.SampleSource with ``fixed`` and ``fingerprint``
    name: str
    report: str

    @property
    def fingerprint(self) -> str:
        return self.cache.fingerprint

    @property
    def fixed(self):
        return self.cache.fixed

    @property
    def has_heldout(self) -> bool:
        return any(e.heldout for e in self.cache.entries)

    def __repr__(self) -> str:
        return f"LynxDataset({self.name}: {len(self.cache)} pairs, {self.cache.fingerprint[:12]})"


# -- where datasets live --------------------------------------------------------------------------
def datasets_root() -> Optional[Path]:
    try:
        import folder_paths
    except ImportError:
        return None
    return Path(folder_paths.get_input_directory()) / DATASETS_FOLDER


def dataset_choices() -> list[str]:
    root = datasets_root()
    if root is None or not root.is_dir():
        return [NO_DATASETS]
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return names or [NO_DATASETS]


def resolve_dataset(name: str) -> Path:
    root = datasets_root()
    where = str(root) if root is not None else "ComfyUI/input/lynx_datasets"
    if not name or name == NO_DATASETS:
        raise ValueError(f"dataset: no dataset folder chosen. Put one folder per dataset under {where} "
                         "(layout in docs/training-data.md), press R to refresh, and pick it here.")
    if Path(name).name != name or name in (".", ".."):
        raise ValueError(f"dataset: {name!r} must be the name of a folder directly under {where}")
    path = (root / name) if root is not None else Path(name)
    if not path.is_dir():
        raise ValueError(f"dataset: {path} does not exist; put the dataset folder under {where} and press R")
    return path


def folder_stamp(path: Path) -> str:
    """Names, sizes and mtimes of every file under ``path``: changes when the dataset does."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# -- ComfyUI's encoders ---------------------------------------------------------------------------
def module_fingerprint(obj: Any) -> str:
    """A cheap content name of a model (names, shapes, dtypes and a strided sample of each weight):
    a different VAE or text encoder never reuses a cache another one made."""
    module = obj if isinstance(obj, torch.nn.Module) else None
    for attr in ("first_stage_model", "cond_stage_model", "patcher"):
        inner = getattr(obj, attr, None)
        if isinstance(inner, torch.nn.Module):
            module = inner
            break
    if module is None:
        return type(obj).__name__
    h = hashlib.sha256(type(module).__name__.encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            flat = t.detach().reshape(-1)
            h.update(f"{name}:{list(t.shape)}:{t.dtype}".encode())
            if flat.numel() and t.is_floating_point():
                h.update(flat[:: max(1, flat.numel() // 16)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def wan_latent_in() -> Callable[[torch.Tensor], torch.Tensor]:
    """The Wan2.1 latent normalisation ComfyUI's Wan model applies to its input (process_latent_in)."""
    try:
        from comfy.latent_formats import Wan21
    except ImportError:
        return lambda z: z  # no ComfyUI (tests): the stand-in VAE already returns model-space latents
    fmt = Wan21()
    return fmt.process_in


def comfy_encode_video(vae, latent_in: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], torch.Tensor]:
    def encode(frames: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(frames, dtype=np.float32)).div(255.0)
        z = vae.encode(pixels)  # [1, 16, F', h, w]: ComfyUI's raw Wan latent
        return latent_in(z.to(torch.float32)).to("cpu")
    return encode


def trim_padding(cond: torch.Tensor) -> torch.Tensor:
    """[1, L, D] or [L, D] -> [L', D] without the trailing all-zero (padding) rows; at least one row."""
    t = cond[0] if cond.ndim == 3 else cond
    nonzero = torch.nonzero(t.abs().amax(dim=-1) > 0).flatten()
    length = int(nonzero[-1]) + 1 if nonzero.numel() else 1
    return t[:length]


def comfy_encode_text(clip) -> Callable[[str], torch.Tensor]:
    def encode(text: str) -> torch.Tensor:
        tokens = clip.tokenize(text)
        cond = clip.encode_from_tokens(tokens)
        if isinstance(cond, (tuple, list)):
            cond = cond[0]
        return trim_padding(cond.to("cpu", torch.float32))
    return encode


class ProgressCounter:
    """Counts encoder calls on a ComfyUI progress bar (reused shards make no calls: the bar jumps)."""

    def __init__(self, total: int, bar=None):
        self.total = max(1, total)
        self.done = 0
        self.bar = bar

    def wrap(self, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.done = min(self.total, self.done + 1)
            if self.bar is not None:
                self.bar.update_absolute(self.done, self.total)
            return out
        return counted

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.update_absolute(self.total, self.total)


def comfy_progress_bar(total: int):
    try:
        import comfy.utils
    except ImportError:
        return None
    return comfy.utils.ProgressBar(total)


def make_encoders(vae, clip, face, counter: ProgressCounter, latent_in=None) -> DataEncoders:
    latent_in = latent_in or wan_latent_in()
    return DataEncoders(encode_video=counter.wrap(comfy_encode_video(vae, latent_in)),
                        encode_text=comfy_encode_text(clip), face=face,
                        vae_id=f"comfyui-vae:{module_fingerprint(vae)}",
                        text_encoder_id=f"comfyui-clip:{module_fingerprint(clip)}")


# -- report and preview ---------------------------------------------------------------------------
def dataset_report(cache: TrainCache, reused: bool) -> str:
    head = "reused the cache (sources and encoders unchanged)" if reused else "built or updated the cache"
    lines = [head, cache.describe()]
    if cache.rebuild_reasons:
        lines.append("re-encoded because: " + "; ".join(cache.rebuild_reasons[:6]))
    if not cache.dropped:
        lines.append("no file was skipped")
    return "\n".join(lines)


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    scale = size / max(h, w)
    small = np.asarray(Image.fromarray(img).resize((max(1, round(w * scale)), max(1, round(h * scale)))))
    cell = np.full((size, size, 3), 32, np.uint8)
    y, x = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    cell[y:y + small.shape[0], x:x + small.shape[1]] = small
    return cell


def preview_grid(cache: TrainCache, dataset_root: Path, cell: int = PREVIEW_CELL,
                 max_rows: int = PREVIEW_MAX_ROWS) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: per pair (up to ``max_rows``), the aligned identity face beside the target's first frame."""
    from lynx_core.train.media import read_frames

    rows = []
    for i, entry in enumerate(cache.entries[:max_rows]):
        face = _fit(cache.reference_crop(i), cell)
        try:
            first = _fit(read_frames(dataset_root / entry.target, 1)[0], cell)
        except Exception as exc:  # a preview must not stop the graph
            log.warning("dataset preview: cannot read %s: %s", entry.target, exc)
            first = np.full((cell, cell, 3), 32, np.uint8)
        rows.append(np.concatenate([face, first], axis=1))
    if not rows:
        rows = [np.full((cell, 2 * cell, 3), 32, np.uint8)]
    grid = np.concatenate(rows, axis=0)
    return torch.from_numpy(grid).to(torch.float32).div(255.0).unsqueeze(0)
