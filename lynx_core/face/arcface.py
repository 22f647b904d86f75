"""ArcFace IR-SE50, the identity network the Lynx resampler was trained with (spec section 6.2).

The module tree follows the TreB1eN/facexlib ``Backbone(50, 0.6, 'ir_se')`` naming so that
facexlib's ``recognition_arcface_ir_se50.pth`` loads strictly: ``input_layer.{0,1,2}``,
``body.{0..23}.shortcut_layer`` / ``res_layer.{0..5}`` (SE block ``res_layer.5.fc1/fc2``) and
``output_layer.{0,3,4}``.

Preprocessing as the official code: aligned 112x112 RGB crop -> [0, 1] -> (x - 0.5) / 0.5 ->
channels reversed to BGR -> network -> L2-normalised 512-d vector, fp32.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .paths import ARCFACE_FILENAME, ARCFACE_URL, arcface_export_cache_dir, find_arcface_files, find_arcface_weights
from .providers import OrtModel, default_providers

logger = logging.getLogger(__name__)

__all__ = [
    "IRSE50",
    "load_arcface",
    "export_arcface_onnx",
    "preprocess_arcface",
    "ArcFaceEncoder",
    "clear_arcface_cache",
]

# (in channels, depth, units) per stage; the first unit of each stage has stride 2.
_IRSE50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class _IRSEUnit(nn.Module):
    """Improved-residual unit with squeeze-excitation (BN-conv-PReLU-conv-BN-SE plus shortcut)."""

    def __init__(self, in_ch: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_ch == depth:
            # A 1x1 max-pool is a strided identity (no parameters, so no state-dict keys).
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_ch, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            _SqueezeExcite(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """ArcFace IR-SE50 backbone: [N, 3, 112, 112] BGR in [-1, 1] -> [N, 512] unit vectors."""

    def __init__(self, drop_ratio: float = 0.6) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units = []
        for in_ch, depth, count in _IRSE50_STAGES:
            units.append(_IRSEUnit(in_ch, depth, 2))
            units += [_IRSEUnit(depth, depth, 1) for _ in range(count - 1)]
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, 512),
            nn.BatchNorm1d(512),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.output_layer(self.body(self.input_layer(x)))
        return feat / torch.norm(feat, 2, dim=1, keepdim=True)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "params"):
            if isinstance(obj.get(key), dict):
                return _extract_state_dict(obj[key], path)
        raise ValueError(f"{path} does not contain an IR-SE50 state dict (keys: {list(obj)[:8]}...).")
    else:
        raise ValueError(f"{path} does not contain a state dict (got {type(obj).__name__}).")
    # Checkpoints saved from DataParallel prefix every key with "module.".
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_arcface(path: str | Path, device: str | torch.device = "cpu") -> IRSE50:
    """Build IR-SE50 and load ``recognition_arcface_ir_se50.pth`` (``weights_only=True``), eval, fp32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ArcFace weights {path} not found. Put {ARCFACE_FILENAME} in ComfyUI/models/facexlib/ "
            f"(download: {ARCFACE_URL})."
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"Could not read {path} as a PyTorch weights file ({exc}). It may be an incomplete download: "
            f"delete it and download {ARCFACE_FILENAME} again from {ARCFACE_URL}."
        ) from exc
    sd = _extract_state_dict(obj, path)
    model = IRSE50()
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not facexlib's ArcFace IR-SE50 ({ARCFACE_FILENAME}): {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with other shapes "
            f"{wrong[:3]}. Lynx needs exactly that network; download it from {ARCFACE_URL}."
        )
    model.load_state_dict(sd, strict=False)  # only num_batches_tracked may be absent in old files
    return model.eval().to(device=device, dtype=torch.float32)


def preprocess_arcface(crops: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, 112, 112, 3] crops -> float32 [N, 3, 112, 112] BGR in [-1, 1] (the official order)."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[1:] != (112, 112, 3):
        raise ValueError(f"ArcFace needs aligned [N, 112, 112, 3] crops, got {crops.shape}.")
    x = crops.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    x = x[..., ::-1]  # RGB -> BGR, as the official code feeds the network
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def export_arcface_onnx(model: IRSE50, path: str | Path, opset: int = 17) -> Path:
    """Export IR-SE50 to a single ONNX file with a dynamic batch axis (written atomically).

    Input ``input`` [N, 3, 112, 112] (BGR, [-1, 1]), output ``embedding`` [N, 512]. Needs the
    ``onnx`` package. The graph also loads in insightface, whose ``ArcFaceONNX`` preprocessing
    of an RGB crop equals ours.
    """
    path = Path(path)
    try:
        import onnx  # noqa: F401  (the TorchScript exporter needs it)
    except ImportError as exc:
        raise ImportError(
            "Exporting ArcFace to ONNX needs the 'onnx' package: `pip install onnx`. Or use the torch backend."
        ) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().to("cpu", torch.float32)
    dummy = torch.zeros(1, 3, 112, 112)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=str(path.parent))
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                tmp_name,
                input_names=["input"],
                output_names=["embedding"],
                dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    logger.info("Exported ArcFace IR-SE50 to %s", path)
    return path


_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def clear_arcface_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ArcFaceEncoder:
    """Aligned 112 crops -> unit 512-d IR-SE50 embeddings, on torch or on onnxruntime.

    ``weights`` is the ``.pth``; ``None`` searches for it (``paths.arcface_search_dirs``).
    ``backend="onnx"`` uses ``onnx_path`` if given, else an existing
    ``recognition_arcface_ir_se50.onnx`` (next to the weights, in the search folders or in
    ``~/.cache/comfyui-lynx``). The ``.pth`` is then needed only when there is no export yet, or
    when it is newer than the export: it is exported next to the weights (or to the cache folder
    if that one is read-only) once and reused afterwards. Loaded models are cached per file and
    device.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        backend: str = "torch",
        device: str | torch.device | None = None,
        onnx_path: str | Path | None = None,
        models_dirs: Sequence[str | Path] | None = None,
        providers: Sequence[Any] | None = None,
        batch_size: int = 16,
    ) -> None:
        if backend not in ("torch", "onnx"):
            raise ValueError(f"ArcFace backend must be 'torch' or 'onnx', got {backend!r}.")
        self.weights: Path | None = Path(weights) if weights is not None else None
        self.backend = backend
        self.device = torch.device(device) if device is not None else _default_device()
        self.batch_size = max(1, int(batch_size))
        self._model: IRSE50 | None = None
        self._ort: OrtModel | None = None
        self.onnx_path: Path | None = None
        if backend == "torch":
            if self.weights is None:
                self.weights = find_arcface_weights(models_dirs)
            key = ("torch",) + _file_key(self.weights) + (str(self.device),)
            with _CACHE_LOCK:
                model = _CACHE.get(key)
                if model is None:
                    model = load_arcface(self.weights, self.device)
                    _CACHE[key] = model
            self._model = model
        else:
            onnx_file = self._ensure_onnx(models_dirs, onnx_path)
            self._ort = OrtModel(onnx_file, providers if providers is not None else default_providers(device))
            self.onnx_path = onnx_file

    def _ensure_onnx(self, models_dirs: Sequence[str | Path] | None, onnx_path: str | Path | None) -> Path:
        weights, existing = find_arcface_files(models_dirs, self.weights, onnx_path)
        if onnx_path is not None:
            assert existing is not None
            return existing
        self.weights = weights
        # Without weights any export is usable; with them, an export older than the .pth is stale.
        if existing is not None and (weights is None or existing.stat().st_mtime >= weights.stat().st_mtime):
            return existing
        assert weights is not None
        target = weights.with_suffix(".onnx")
        if not os.access(target.parent, os.W_OK):
            target = arcface_export_cache_dir() / target.name
        logger.info("No up-to-date ONNX export of %s yet; exporting once to %s", weights.name, target)
        return export_arcface_onnx(load_arcface(weights, "cpu"), target)

    @property
    def provider(self) -> str:
        if self._ort is not None:
            return f"onnxruntime {self._ort.provider}"
        return f"torch {self.device}"

    def encode(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 RGB [N, 112, 112, 3] aligned crops -> float32 CPU [N, 512] unit vectors."""
        x = preprocess_arcface(crops)
        outs = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            if self._ort is not None:
                outs.append(torch.from_numpy(np.asarray(self._ort(chunk)[0], dtype=np.float32)))
            else:
                assert self._model is not None
                with torch.inference_mode():
                    t = torch.from_numpy(chunk).to(self.device)
                    outs.append(self._model(t).float().cpu())
        if not outs:
            return torch.zeros(0, 512)
        return torch.cat(outs, 0)
