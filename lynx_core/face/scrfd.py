"""SCRFD detector (the ``det_10g.onnx`` / ``scrfd_10g_bnkps.onnx`` of insightface packs) on onnxruntime.

Used when a pack is present but insightface is not importable. It reproduces what insightface's
detector does inside the official pipeline (``FaceAnalysis.prepare(det_size=(640, 640))``,
threshold 0.5, NMS 0.4, spec section 6.1):

* letterbox: resize (bilinear, OpenCV rules) to fit 640x640 keeping the aspect ratio, paste into
  the top-left corner of a black canvas;
* blob: (x - 127.5) / 128, NCHW, with insightface's red/blue swap applied to the array it is given.
  Lynx hands insightface an RGB array although insightface expects BGR, so the network sees BGR;
  ``lynx_channel_order=True`` (the default) reproduces that;
* outputs: for each stride (8, 16, 32 or 8..128) a score map, distance-encoded boxes and (for 9 or
  15 outputs) distance-encoded 5 keypoints, anchors at ``stride * (col, row)``, 2 anchors per cell
  for 3-stride models;
* decode, threshold, scale back by the letterbox factor, NMS.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .imageops import resize_linear
from .mtcnn import nms
from .providers import OrtModel
from .types import DetectedFace

logger = logging.getLogger(__name__)

__all__ = ["SCRFDDetector", "scrfd_layout", "letterbox", "decode_scrfd"]


def scrfd_layout(num_outputs: int) -> tuple[list[int], int, bool]:
    """(strides, anchors per cell, has keypoints) for an SCRFD graph with ``num_outputs`` outputs."""
    layouts = {
        6: ([8, 16, 32], 2, False),
        9: ([8, 16, 32], 2, True),
        10: ([8, 16, 32, 64, 128], 1, False),
        15: ([8, 16, 32, 64, 128], 1, True),
    }
    if num_outputs not in layouts:
        raise ValueError(f"Not an SCRFD detector: it has {num_outputs} outputs (expected 6, 9, 10 or 15).")
    return layouts[num_outputs]


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize into a ``size`` (w, h) canvas, top-left aligned; returns (canvas, scale)."""
    in_w, in_h = size
    h, w = image.shape[:2]
    if h / w > in_h / in_w:
        new_h = in_h
        new_w = int(new_h / (h / w))
    else:
        new_w = in_w
        new_h = int(new_w * (h / w))
    canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resize_linear(image, new_w, new_h)
    return canvas, new_h / h


def _anchor_centres(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    centres = (np.stack([cols, rows], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
    if anchors > 1:
        centres = np.repeat(centres, anchors, axis=0)
    return centres


def decode_scrfd(
    outputs: Sequence[np.ndarray],
    input_hw: tuple[int, int],
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Decode raw SCRFD outputs (in graph order) into (scores [K], boxes [K, 4], kps [K, 5, 2] or None).

    Coordinates are in the network input's pixels. Outputs may carry a leading batch axis of 1.
    """
    strides, anchors, has_kps = scrfd_layout(len(outputs))
    levels = len(strides)
    in_h, in_w = input_hw
    all_scores, all_boxes, all_kps = [], [], []
    for i, stride in enumerate(strides):
        scores = np.asarray(outputs[i]).reshape(-1)
        dist = np.asarray(outputs[i + levels]).reshape(-1, 4) * stride
        centres = _anchor_centres(in_h // stride, in_w // stride, stride, anchors)
        if len(centres) != len(scores):
            raise ValueError(
                f"SCRFD stride {stride}: {len(scores)} scores for {len(centres)} anchors; the input size "
                f"{in_w}x{in_h} does not match the model."
            )
        keep = np.nonzero(scores >= threshold)[0]
        c = centres[keep]
        d = dist[keep]
        all_scores.append(scores[keep])
        all_boxes.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], axis=1))
        if has_kps:
            k = np.asarray(outputs[i + 2 * levels]).reshape(-1, 10)[keep] * stride
            all_kps.append(k.reshape(-1, 5, 2) + c[:, None, :])
    scores = np.concatenate(all_scores).astype(np.float32)
    boxes = np.concatenate(all_boxes).astype(np.float32)
    kps = np.concatenate(all_kps).astype(np.float32) if has_kps else None
    return scores, boxes, kps


class SCRFDDetector:
    """An insightface-pack SCRFD model run by our own decoder."""

    def __init__(
        self,
        model_path: str | Path,
        providers: Sequence[Any] | None = None,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
        lynx_channel_order: bool = True,
        name: str | None = None,
    ) -> None:
        self.model = OrtModel(model_path, providers)
        self.strides, self.anchors, has_kps = scrfd_layout(len(self.model.outputs))
        if not has_kps:
            raise ValueError(
                f"{model_path} is an SCRFD detector without landmarks; Lynx needs the 5-point (kps) variant "
                "(det_10g.onnx or scrfd_10g_bnkps.onnx)."
            )
        shape = self.model.inputs[0].shape
        if isinstance(shape[2], int) and isinstance(shape[3], int):
            # Like insightface: a model with a fixed input size ignores det_size.
            det_size = (int(shape[3]), int(shape[2]))
        self.det_size = det_size
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        self.lynx_channel_order = lynx_channel_order
        self.name = name or f"scrfd:{Path(model_path).name}"

    @property
    def provider(self) -> str:
        return self.model.provider

    def describe(self) -> str:
        return f"{self.name} (built-in SCRFD decoder, {self.provider})"

    def blob(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        canvas, scale = letterbox(image, self.det_size)
        if self.lynx_channel_order:
            canvas = canvas[:, :, ::-1]  # insightface's swapRB applied to Lynx's RGB array
        blob = (canvas.astype(np.float32) - 127.5) / 128.0
        return np.ascontiguousarray(blob.transpose(2, 0, 1)[None]), scale

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        blob, scale = self.blob(image)
        outputs = self.model(blob)
        scores, boxes, kps = decode_scrfd(outputs, blob.shape[2:4], self.det_thresh)
        if len(scores) == 0:
            return []
        boxes = boxes / scale
        kps = kps / scale  # type: ignore[operator]
        order = np.argsort(-scores, kind="stable")
        scores, boxes, kps = scores[order], boxes[order], kps[order]
        keep = nms(boxes, scores, self.nms_thresh, "union")
        return [DetectedFace(bbox=boxes[i], kps=kps[i], score=float(scores[i])) for i in keep]
