"""FaceAnalyzer: detection, face choice, alignment and the ArcFace identity in one object.

Face choice (per image, faces ordered left to right by box centre):

* ``"largest"`` (default, the official rule): the face with the largest box area;
* ``"index"``: face number ``index`` in left-to-right order (0 = leftmost);
* ``"all"``: every face found.

Several images (or ``"all"`` on a group photo) give one identity: the per-face unit embeddings
are averaged and the mean is renormalised to unit length. The first used face's 256 crop is the
Lynx reference image.

When an image has no face, ``on_no_face="error"`` raises ``NoFaceError`` naming the image;
``on_no_face="skip"`` logs it (at warning level unless ``warn_skipped=False``) and carries on, and
if no image had a usable face the identity is returned with ``embedding=None`` ("no identity") so a
queued batch keeps running.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .align import align_arcface_112, align_reference_256
from .arcface import ArcFaceEncoder
from .detectors import Detector, build_detector
from .imageops import to_uint8_rgb
from .paths import find_arcface_weights
from .providers import default_providers
from .types import DetectedFace, FaceIdentity, FaceSelectionError, NoFaceError

logger = logging.getLogger(__name__)

__all__ = ["FaceAnalyzer", "sort_left_to_right", "select_faces", "average_embeddings", "clear_face_cache"]

SELECT_MODES = ("largest", "index", "all")
NO_FACE_MODES = ("error", "skip")

_DETECTORS: dict[tuple, Detector] = {}
_LOCK = threading.Lock()


def clear_face_cache() -> None:
    """Forget cached detectors (ONNX sessions and ArcFace models have their own caches)."""
    from .arcface import clear_arcface_cache
    from .providers import clear_session_cache

    with _LOCK:
        _DETECTORS.clear()
    clear_arcface_cache()
    clear_session_cache()


def sort_left_to_right(faces: Sequence[DetectedFace]) -> list[DetectedFace]:
    """Order faces by box centre x (then y), the order ``index`` refers to."""
    return sorted(faces, key=lambda f: (f.center[0], f.center[1]))


def select_faces(faces: Sequence[DetectedFace], select: str, index: int = 0) -> list[int]:
    """Indices (into ``faces``, already left-to-right) chosen by ``select``; [] when there are none."""
    if select not in SELECT_MODES:
        raise ValueError(f"Unknown face selection {select!r}; use one of {SELECT_MODES}.")
    if not faces:
        return []
    if select == "largest":
        areas = [f.area for f in faces]
        return [int(np.argmax(areas))]  # first (leftmost) wins ties
    if select == "all":
        return list(range(len(faces)))
    if index < 0:
        index = len(faces) + index
    if not 0 <= index < len(faces):
        raise FaceSelectionError(
            f"face index {index} requested but only {len(faces)} face(s) were found (indices 0..{len(faces) - 1}, "
            "left to right)."
        )
    return [index]


def average_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean of unit embeddings [M, 512], renormalised to unit length."""
    mean = embeddings.float().mean(dim=0)
    norm = torch.linalg.vector_norm(mean)
    if float(norm) < 1e-6:
        raise ValueError("The face embeddings cancel out (their mean is ~0); use fewer or more similar photos.")
    return mean / norm


def _as_image_list(images: Any) -> list[np.ndarray]:
    if hasattr(images, "detach"):
        images = images.detach().cpu().float().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [images[i] for i in range(images.shape[0])]
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"Expected images as [N, H, W, 3] or [H, W, 3], got shape {images.shape}.")
    return list(images)


class FaceAnalyzer:
    """Detect faces, pick one (or several), align them and compute the Lynx ArcFace identity.

    ``detector``: ``"auto"`` | ``"mtcnn"`` | ``"insightface:buffalo_l"`` | ``"insightface:antelopev2"``
    | ``"insightface:<pack or folder>"``. ``insightface_backend``: ``"auto"`` (insightface when it
    imports, else the built-in SCRFD decoder), ``"insightface"`` or ``"builtin"``.
    ``arcface_backend``: ``"torch"`` or ``"onnx"`` (same numbers within 1e-4); ``"onnx"`` runs from
    ``recognition_arcface_ir_se50.onnx`` alone, the ``.pth`` being needed only to export that file
    the first time. Models load lazily and are cached, so constructing analyzers is cheap.
    """

    def __init__(
        self,
        detector: str = "auto",
        models_dirs: Sequence[str | Path] | None = None,
        arcface_path: str | Path | None = None,
        arcface_backend: str = "torch",
        device: str | torch.device | None = None,
        insightface_backend: str = "auto",
        det_size: int | tuple[int, int] = 640,
        det_thresh: float = 0.5,
        arcface_onnx_path: str | Path | None = None,
    ) -> None:
        if arcface_backend not in ("torch", "onnx"):
            raise ValueError(f"arcface_backend must be 'torch' or 'onnx', got {arcface_backend!r}.")
        self.detector_spec = detector
        self.models_dirs = [Path(d) for d in models_dirs] if models_dirs else []
        self.arcface_path = Path(arcface_path) if arcface_path is not None else None
        self.arcface_backend = arcface_backend
        self.arcface_onnx_path = Path(arcface_onnx_path) if arcface_onnx_path is not None else None
        self.device = torch.device(device) if device is not None else None
        self.insightface_backend = insightface_backend
        self.det_size = (det_size, det_size) if isinstance(det_size, int) else tuple(det_size)
        self.det_thresh = float(det_thresh)
        self._detector: Detector | None = None
        self._encoder: ArcFaceEncoder | None = None

    # -- models ------------------------------------------------------------------------------
    @property
    def providers(self) -> list[Any]:
        return default_providers(self.device)

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            providers = self.providers
            key = (
                self.detector_spec,
                tuple(str(d) for d in self.models_dirs),
                repr(providers),
                self.insightface_backend,
                self.det_size,
                self.det_thresh,
            )
            with _LOCK:
                det = _DETECTORS.get(key)
            if det is None:
                det = build_detector(
                    self.detector_spec,
                    self.models_dirs,
                    providers,
                    backend=self.insightface_backend,
                    det_size=self.det_size,  # type: ignore[arg-type]
                    det_thresh=self.det_thresh,
                )
                with _LOCK:
                    _DETECTORS[key] = det
            self._detector = det
        return self._detector

    @property
    def encoder(self) -> ArcFaceEncoder:
        if self._encoder is None:
            # The onnx backend may run from the .onnx export alone, so only torch insists on the .pth
            # here; the encoder searches for whichever file the onnx backend needs.
            if self.arcface_backend == "torch":
                weights: Path | None = find_arcface_weights(self.models_dirs, self.arcface_path)
            else:
                weights = self.arcface_path
            self._encoder = ArcFaceEncoder(
                weights,
                backend=self.arcface_backend,
                device=self.device,
                onnx_path=self.arcface_onnx_path,
                models_dirs=self.models_dirs,
            )
        return self._encoder

    # -- detection ---------------------------------------------------------------------------
    def detect(self, image_rgb_uint8: np.ndarray) -> list[DetectedFace]:
        """All faces in one RGB image, left to right."""
        image = to_uint8_rgb(image_rgb_uint8)
        return sort_left_to_right(self.detector.detect(image))

    # -- identity ----------------------------------------------------------------------------
    def encode(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        select: str = "largest",
        index: int = 0,
        on_no_face: str = "error",
        warn_skipped: bool = True,
    ) -> FaceIdentity:
        """Detect, choose, align and embed; see the module docstring for the rules.

        ``warn_skipped=False`` logs skipped images at debug level only, for callers that run
        one image at a time and sum the skips up themselves (one warning per run, not per frame).
        """
        if select not in SELECT_MODES:
            raise ValueError(f"Unknown face selection {select!r}; use one of {SELECT_MODES}.")
        if on_no_face not in NO_FACE_MODES:
            raise ValueError(f"on_no_face must be one of {NO_FACE_MODES}, got {on_no_face!r}.")
        image_list = _as_image_list(images)
        if not image_list:
            raise ValueError("No input image was given to the face encoder.")
        n = len(image_list)
        skip_level = logging.WARNING if warn_skipped else logging.DEBUG

        all_faces: list[list[DetectedFace]] = []
        chosen: list[list[int]] = []
        messages: list[str] = []
        kps_used, crops112, crops256, sources = [], [], [], []
        for i, raw in enumerate(image_list):
            label = f"image {i + 1} of {n}" if n > 1 else "the input image"
            image = to_uint8_rgb(raw, label)
            faces = self.detect(image)
            all_faces.append(faces)
            if not faces:
                msg = (
                    f"No face found in {label} ({image.shape[1]}x{image.shape[0]}). Use a photo where the face is "
                    "clearly visible, frontal and at least ~40 px wide"
                )
                if on_no_face == "error":
                    raise NoFaceError(msg + ", or pass on_no_face='skip' to skip images without a face.",
                                      image_index=i, image_size=(int(image.shape[1]), int(image.shape[0])))
                logger.log(skip_level, "%s; skipping it.", msg)
                messages.append(f"{label}: no face found, skipped.")
                chosen.append([])
                continue
            try:
                picked = select_faces(faces, select, index)
            except FaceSelectionError as exc:
                if on_no_face == "error":
                    err = FaceSelectionError(f"{label}: {exc}")
                    err.image_index = i  # for callers that name images their own way
                    raise err from exc
                logger.log(skip_level, "%s: %s Skipping it.", label, exc)
                messages.append(f"{label}: {exc} Skipped.")
                chosen.append([])
                continue
            chosen.append(picked)
            if len(faces) > 1:
                what = {"largest": "the largest", "index": f"index {index}", "all": "all of them"}[select]
                msg = f"{label}: {len(faces)} faces found (numbered left to right); using {what}: #{', #'.join(map(str, picked))}."
                logger.info(msg)
                messages.append(msg)
            for j in picked:
                kps = faces[j].kps
                crops112.append(align_arcface_112(image, kps)[0])
                crops256.append(align_reference_256(image, kps)[0])
                kps_used.append(kps)
                sources.append((i, j))

        detector_desc = self.detector.describe()
        if not sources:
            return FaceIdentity(
                embedding=None,
                landmarks=np.zeros((0, 5, 2), np.float32),
                crop112=np.zeros((0, 112, 112, 3), np.uint8),
                crop256=np.zeros((0, 256, 256, 3), np.uint8),
                faces_found=[len(f) for f in all_faces],
                chosen=chosen,
                provider=f"detector: {detector_desc}",
                faces=all_faces,
                sources=[],
                face_embeddings=None,
                detector=self.detector.name,
                messages=messages,
            )

        encoder = self.encoder
        crop112 = np.stack(crops112)
        per_face = encoder.encode(crop112)
        embedding = average_embeddings(per_face) if len(per_face) > 1 else per_face[0].clone()
        if len(per_face) > 1:
            messages.append(f"Identity = renormalised mean of {len(per_face)} face embeddings.")
        return FaceIdentity(
            embedding=embedding,
            landmarks=np.stack(kps_used).astype(np.float32),
            crop112=crop112,
            crop256=np.stack(crops256),
            faces_found=[len(f) for f in all_faces],
            chosen=chosen,
            provider=f"detector: {detector_desc}; arcface: {encoder.provider}",
            faces=all_faces,
            sources=sources,
            face_embeddings=per_face,
            detector=self.detector.name,
            messages=messages,
        )

    def previews(self, images: Sequence[np.ndarray] | np.ndarray, identity: FaceIdentity) -> list[np.ndarray]:
        """One annotated picture per input image (boxes, points, indices; used faces in green)."""
        from .preview import draw_preview

        image_list = _as_image_list(images)
        return [
            draw_preview(img, identity.faces[i] if i < len(identity.faces) else [], identity.chosen[i] if i < len(identity.chosen) else [])
            for i, img in enumerate(image_list)
        ]
