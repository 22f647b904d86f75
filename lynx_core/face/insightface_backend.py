"""The insightface route for pack detectors, used only when ``insightface`` imports cleanly.

insightface is optional (0.7.3 needs a C++ compiler on Windows, 2.x pulls opencv-python and
CPU onnxruntime), so nothing here is imported at module load. We load only the pack's detector
through ``insightface.model_zoo.get_model`` (the same class ``FaceAnalysis`` would build), which
also works for the nested ``antelopev2/antelopev2`` folder that ``FaceAnalysis`` rejects.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .types import DetectedFace

logger = logging.getLogger(__name__)

__all__ = ["insightface_available", "InsightFaceDetector"]


def insightface_available() -> bool:
    """True when an ``insightface`` package is installed (it may still fail to import)."""
    try:
        return importlib.util.find_spec("insightface") is not None
    except (ImportError, ValueError):
        return False


def _provider_names(providers: Sequence[Any]) -> list[Any]:
    return [p if isinstance(p, str) else p[0] for p in providers]


class InsightFaceDetector:
    """An insightface detector model, prepared exactly as Lynx's ``FaceAnalysis`` prepares it."""

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[Any],
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        name: str | None = None,
    ) -> None:
        from insightface.model_zoo import get_model  # raises ImportError on broken installs

        self.path = Path(model_path)
        model = get_model(str(self.path), providers=_provider_names(providers))
        if model is None or getattr(model, "taskname", "detection") != "detection":
            raise RuntimeError(f"insightface did not recognise {self.path} as a face detector.")
        ctx_id = 0 if _provider_names(providers)[0] == "CUDAExecutionProvider" else -1
        model.prepare(ctx_id, input_size=tuple(det_size), det_thresh=float(det_thresh))
        self.model = model
        self.name = name or f"insightface:{self.path.parent.name}"

    @property
    def provider(self) -> str:
        session = getattr(self.model, "session", None)
        if session is not None and hasattr(session, "get_providers"):
            return session.get_providers()[0]
        return "unknown"

    def describe(self) -> str:
        return f"{self.name} (insightface, {self.provider})"

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        # Lynx passes its RGB array straight to insightface (which assumes BGR): do the same so that
        # the landmarks match the official ones.
        try:
            bboxes, kpss = self.model.detect(image, max_num=0, metric="default")
        except TypeError:  # other insightface versions take fewer keyword arguments
            bboxes, kpss = self.model.detect(image)
        if bboxes is None or len(bboxes) == 0:
            return []
        if kpss is None:
            raise RuntimeError(f"{self.path.name} returns no landmarks; use a detector with 5-point output.")
        return [
            DetectedFace(bbox=np.asarray(b[:4]), kps=np.asarray(k), score=float(b[4]) if len(b) > 4 else 1.0)
            for b, k in zip(bboxes, kpss)
        ]
