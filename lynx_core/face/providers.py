"""onnxruntime access: import checks, execution-provider choice and cached sessions.

Users hit two onnxruntime traps: ``onnxruntime`` and ``onnxruntime-gpu`` installed together
(they share one folder, so uninstalling either leaves a module without ``InferenceSession``),
and a GPU build whose CUDA libraries do not match (it silently runs on CPU). We import lazily,
detect the broken install, pick CUDA then CPU only when torch sees a GPU, and always report the
provider that the session really uses.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["import_onnxruntime", "default_providers", "OrtModel", "clear_session_cache"]

_FIX_ORT = (
    "Install exactly one ONNX runtime into ComfyUI's Python: `pip install onnxruntime` (CPU) or, for "
    "NVIDIA GPUs, `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`. "
    "Never keep both installed: they overwrite each other's files."
)


def import_onnxruntime() -> Any:
    """Import onnxruntime or raise an error that says how to repair the install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError(f"onnxruntime is not installed, so face detection cannot run. {_FIX_ORT}") from exc
    if not hasattr(ort, "InferenceSession"):
        raise ImportError(
            "onnxruntime is installed but broken (no InferenceSession): this happens when onnxruntime and "
            f"onnxruntime-gpu were installed together and one was removed. {_FIX_ORT}"
        )
    return ort


def _torch_wants_cuda(device: Any = None) -> tuple[bool, int]:
    try:
        import torch
    except ImportError:
        return False, 0
    if device is not None:
        dev = torch.device(device)
        return dev.type == "cuda", (dev.index or 0)
    return bool(torch.cuda.is_available()), 0


def default_providers(device: Any = None) -> list[Any]:
    """CUDA then CPU when torch sees (or ``device`` names) a GPU and onnxruntime has CUDA; CPU otherwise."""
    ort = import_onnxruntime()
    wants_cuda, index = _torch_wants_cuda(device)
    available = ort.get_available_providers()
    if wants_cuda and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if wants_cuda:
        logger.info(
            "torch sees a GPU but onnxruntime offers only %s; face models run on CPU (fine: they are small). "
            "For GPU: pip uninstall -y onnxruntime && pip install onnxruntime-gpu.",
            available,
        )
    return ["CPUExecutionProvider"]


def _provider_key(providers: Sequence[Any]) -> tuple:
    key = []
    for p in providers:
        if isinstance(p, (tuple, list)):
            key.append((p[0], tuple(sorted(p[1].items()))))
        else:
            key.append(p)
    return tuple(key)


_SESSIONS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def clear_session_cache() -> None:
    with _LOCK:
        _SESSIONS.clear()


class OrtModel:
    """A cached onnxruntime session for one model file, with input/output names at hand."""

    def __init__(self, path: str | Path, providers: Sequence[Any] | None = None) -> None:
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model file not found: {self.path}")
        providers = list(providers) if providers is not None else default_providers()
        stat = self.path.stat()
        key = (str(self.path.resolve()), stat.st_mtime_ns, stat.st_size, _provider_key(providers))
        with _LOCK:
            session = _SESSIONS.get(key)
            if session is None:
                options = ort.SessionOptions()
                options.log_severity_level = 3  # keep onnxruntime's own warnings out of the ComfyUI console
                try:
                    session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
                except Exception as exc:  # onnxruntime raises its own exception types
                    raise RuntimeError(
                        f"onnxruntime could not load {self.path}: {exc}. The file may be truncated or not an ONNX "
                        "model; delete it and copy it again."
                    ) from exc
                _SESSIONS[key] = session
        self.session = session
        self.inputs = session.get_inputs()
        self.outputs = session.get_outputs()
        self.input_name = self.inputs[0].name
        self.output_names = [o.name for o in self.outputs]

    @property
    def provider(self) -> str:
        """The provider that really runs this session (onnxruntime falls back silently)."""
        return self.session.get_providers()[0]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
