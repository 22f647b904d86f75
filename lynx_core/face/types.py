"""Data types and errors shared by the face pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is only needed for the embedding field's type
    import torch

__all__ = [
    "DetectedFace",
    "FaceIdentity",
    "FaceError",
    "NoFaceError",
    "FaceSelectionError",
    "FaceModelNotFoundError",
]


class FaceError(RuntimeError):
    """Base class of the face pipeline's user-facing errors."""


class NoFaceError(FaceError, ValueError):
    """No face was found in an input image (the message names the image).

    ``image_index`` (0-based position in the batch) and ``image_size`` (width, height) let a
    caller such as a ComfyUI node word the error in its own terms.
    """

    def __init__(self, message: str, image_index: int | None = None,
                 image_size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.image_index = image_index
        self.image_size = image_size


class FaceSelectionError(FaceError, ValueError):
    """The requested face (by index) does not exist in an image."""


class FaceModelNotFoundError(FaceError, FileNotFoundError):
    """A model file is missing; the message lists every place searched and where to put it."""


@dataclass
class DetectedFace:
    """One detected face in image pixel coordinates (x right, y down; pixel centres on integers).

    ``kps`` holds the 5 ArcFace points: image-left eye, image-right eye, nose tip, image-left
    mouth corner, image-right mouth corner.
    """

    bbox: np.ndarray  # float32 [4]: x1, y1, x2, y2
    kps: np.ndarray  # float32 [5, 2]
    score: float

    def __post_init__(self) -> None:
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(4)
        self.kps = np.asarray(self.kps, dtype=np.float32).reshape(5, 2)
        self.score = float(self.score)

    @property
    def area(self) -> float:
        """Box area, the measure the official code uses to pick the main face."""
        return float(max(0.0, self.bbox[2] - self.bbox[0]) * max(0.0, self.bbox[3] - self.bbox[1]))

    @property
    def center(self) -> tuple[float, float]:
        return float((self.bbox[0] + self.bbox[2]) / 2), float((self.bbox[1] + self.bbox[3]) / 2)


@dataclass
class FaceIdentity:
    """What ``FaceAnalyzer.encode`` returns: the identity and everything needed to show how it was made.

    ``embedding`` is the unit-norm 512-d ArcFace IR-SE50 vector (float32, CPU) averaged over every
    face used and renormalised, or ``None`` when no face was usable (pass-through mode).
    Per used face (in the order images were given, then left to right): ``landmarks`` [M, 5, 2],
    ``crop112`` [M, 112, 112, 3] and ``crop256`` [M, 256, 256, 3] uint8 RGB, ``sources``
    (image index, face index) and ``face_embeddings`` [M, 512]. Per image: ``faces`` (all
    detections, left to right), ``faces_found`` and ``chosen`` (indices into ``faces``).
    """

    embedding: "torch.Tensor | None"
    landmarks: np.ndarray
    crop112: np.ndarray
    crop256: np.ndarray
    faces_found: list[int]
    chosen: list[list[int]]
    provider: str
    faces: list[list[DetectedFace]] = field(default_factory=list)
    sources: list[tuple[int, int]] = field(default_factory=list)
    face_embeddings: "torch.Tensor | None" = None
    detector: str = ""
    messages: list[str] = field(default_factory=list)

    @property
    def has_identity(self) -> bool:
        return self.embedding is not None

    @property
    def reference_crop(self) -> np.ndarray | None:
        """The 256 px crop the reference pass uses (the first used face), or None."""
        return self.crop256[0] if len(self.crop256) else None

    def summary(self) -> str:
        """One human-readable paragraph: what was found, what was used, what ran."""
        lines = list(self.messages)
        used = len(self.sources)
        if self.has_identity:
            lines.append(f"Identity from {used} face(s) in {len(self.faces_found)} image(s).")
        else:
            lines.append("No identity: no usable face in any input image.")
        lines.append(f"Ran on: {self.provider}")
        return "\n".join(lines)
