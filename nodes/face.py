"""LynxEncodeFaceID and LynxFaceSimilarity: the face pipeline of lynx_core on ComfyUI IMAGEs."""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from . import comfy_env
from .images import from_uint8, to_uint8
from .payloads import LYNX_FACE
from lynx_core.face.similarity import cosine_per_frame as core_cosine_per_frame, missing_frames
from lynx_core.face.types import FaceSelectionError, NoFaceError
from lynx_core.video import next_free_path

log = logging.getLogger(__name__)

DETECTORS = ["auto", "mtcnn", "insightface:buffalo_l", "insightface:antelopev2"]
SELECT = ["largest", "index", "all"]
ARCFACE_BACKENDS = ["torch", "onnx"]
ON_NO_FACE = {"error": "error", "pass_through": "skip"}

_DETECTOR_TIP = ("Face detector for the 5 landmarks. auto: the insightface pack buffalo_l (the official one) "
                 "or antelopev2 from models/insightface/models/ when present, else the built-in MTCNN "
                 "(no download; landmarks differ slightly from the official ones).")


def compute_device():
    try:
        import comfy.model_management as mm

        return mm.get_torch_device()
    except ImportError:
        return torch.device("cpu")


# Where non-finite pixels come from, per input, for the error message (a photo file never holds them).
_NAN_SOURCE = {
    "image": ("Load Image never produces them: a node between the photo and this one did (a VAE Decode of a "
              "NaN latent, an upscaler or image operation that divided by zero). Connect the photo from Load "
              "Image directly, or fix that node"),
    "images": ("these frames come from VAE Decode, so the sampled latent already held NaN/inf: the sampling "
               "diverged (often fp16 overflow: run the model in bf16 or fp8-scaled instead of fp16, lower cfg, "
               "or check the LoRAs). Fix the sampling and decode again; a score of these frames would mean nothing"),
}


def check_finite(images, input_name: str) -> None:
    """Refuse IMAGE batches holding NaN/inf: converted to pixels they turn black and read as "no face"."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        return  # to_uint8 reports shape and type problems with the input's name
    bad = (~torch.isfinite(images.detach())).reshape(images.shape[0], -1).sum(dim=1)
    where = [int(i) for i in torch.nonzero(bad).flatten()]
    if not where:
        return
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    shown = ", ".join(f"{i} ({int(bad[i])} values)" for i in where[:8]) + (", ..." if len(where) > 8 else "")
    raise ValueError(
        f"{input_name}: the image(s) at batch index {shown} (of {n}, {w}x{h}) contain NaN or infinite values, so "
        f"no face could be found there. {_NAN_SOURCE.get(input_name, 'The node that made them produced them')}.")


def no_face_message(exc: NoFaceError, batch_size: int) -> str:
    """The analyzer's no-face error in the node's terms: its input, the batch index and its widget."""
    i = exc.image_index if exc.image_index is not None else 0
    size = f", {exc.image_size[0]}x{exc.image_size[1]}" if exc.image_size else ""
    return (f"image: no face found in batch index {i} (of {batch_size}{size}). Use a photo where the face is "
            "clearly visible, frontal and at least ~40 px wide, or set on_no_face to pass_through on this node "
            "to skip photos without a face.")


def make_analyzer(detector: str, arcface_backend: str = "torch"):
    from lynx_core.face.analyzer import FaceAnalyzer

    if detector not in DETECTORS and not detector.startswith("insightface:"):
        raise ValueError(f"detector: unknown choice {detector!r}; use one of {DETECTORS}")
    if arcface_backend not in ARCFACE_BACKENDS:
        raise ValueError(f"arcface_backend: unknown choice {arcface_backend!r}; use torch or onnx")
    return FaceAnalyzer(detector=detector, models_dirs=comfy_env.models_root_dirs(),
                        arcface_backend=arcface_backend, device=compute_device())


class LynxEncodeFaceID:
    DESCRIPTION = ("Finds the face in one or more photos of one person and computes the Lynx identity: the "
                   "ArcFace embedding (averaged over all photos), the 5 landmarks and the aligned crops.")
    CATEGORY = "Lynx/face"
    RETURN_TYPES = (LYNX_FACE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("face", "preview", "aligned_face")
    OUTPUT_TOOLTIPS = ("The identity, for Lynx Encode Reference and Lynx Sampler.",
                       "The input photos with the detected faces: boxes, the 5 points and left-to-right "
                       "indices; used faces in green.",
                       "The 256 px aligned face used as the Ref-adapter's reference image.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "One or more photos of the same person (a batch averages the identity)."}),
            "detector": (DETECTORS, {"default": "auto", "tooltip": _DETECTOR_TIP}),
            "face_select": (SELECT, {"default": "largest",
                            "tooltip": "Which face when a photo shows several: largest (the official rule), the "
                                       "one at face_index (numbered left to right from 0), or all of them (averaged)."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 64,
                                   "tooltip": "With face_select = index: the face to use, counted left to right from 0 "
                                              "(the preview shows the numbers)."}),
            "arcface_backend": (ARCFACE_BACKENDS, {"default": "torch",
                                "tooltip": "Run ArcFace IR-SE50 (models/facexlib/recognition_arcface_ir_se50.pth) "
                                           "with PyTorch or with onnxruntime. onnx runs from recognition_arcface_ir_se50.onnx alone; "
                                           "the .pth is only needed to export it the first time."}),
            "on_no_face": (list(ON_NO_FACE), {"default": "error",
                           "tooltip": "error: stop when a photo has no usable face. pass_through: skip it; with no "
                                      "face at all the video is made without an identity (keeps batch queues running)."}),
        }}

    def encode(self, image, detector, face_select, face_index, arcface_backend, on_no_face):
        if on_no_face not in ON_NO_FACE:
            raise ValueError(f"on_no_face: unknown choice {on_no_face!r}; use error or pass_through")
        check_finite(image, "image")
        pixels = to_uint8(image, "image")
        analyzer = make_analyzer(detector, arcface_backend)
        try:
            identity = analyzer.encode(pixels, select=face_select, index=int(face_index),
                                       on_no_face=ON_NO_FACE[on_no_face])
        except NoFaceError as exc:
            raise NoFaceError(no_face_message(exc, len(pixels)), exc.image_index, exc.image_size) from None
        except FaceSelectionError as exc:
            where = getattr(exc, "image_index", None)
            what = f"batch index {where}: {exc.__cause__}" if where is not None and exc.__cause__ else str(exc)
            raise FaceSelectionError(
                f"face_index: {what} Pick a number shown in the preview, set face_select to largest, or set "
                "on_no_face to pass_through on this node to skip that photo.") from None
        log.info("Lynx face: %s", identity.summary().replace("\n", " | "))
        preview = from_uint8(np.stack(analyzer.previews(pixels, identity)))
        if len(identity.crop256):
            aligned = from_uint8(identity.crop256)
        else:
            aligned = torch.full((1, 256, 256, 3), 0.5)
        # Shown on the node itself (like Preview Image), so users see which face was used without
        # wiring a preview node; the caption text is rendered by web/lynx_preview.js.
        ui = {"images": save_temp_previews(analyzer.previews(pixels, identity)),
              "lynx_faces": [identity.summary()]}
        return {"ui": ui, "result": (identity, preview, aligned)}


def save_temp_previews(previews: list[np.ndarray], prefix: str = "lynx_face") -> list[dict]:
    """Write preview PNGs to ComfyUI's temp folder; returns the ui image records."""
    from PIL import Image

    out = []
    temp = comfy_env.temp_directory()
    temp.mkdir(parents=True, exist_ok=True)
    for arr in previews:
        path = next_free_path(temp, prefix, "png")
        Image.fromarray(arr).save(path, compress_level=1)
        out.append({"filename": path.name, "subfolder": "", "type": "temp"})
    return out


def cosine_per_frame(analyzer, frames: np.ndarray, reference: torch.Tensor) -> list[float | None]:
    """ArcFace cosine similarity of the largest face in each frame to ``reference`` (None: no face).

    The scoring itself is lynx_core's (the study scorer of lynx_batch runs the same function).
    """
    scores = core_cosine_per_frame(analyzer, frames, reference, cancel=comfy_env.throw_if_interrupted)
    missing = missing_frames(scores)
    if missing:
        # One line per run: a video without faces would otherwise log the same advice for every frame.
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        log.warning("Lynx Face Similarity: no face found in %d of %d frame(s) (batch index %s); they are null in "
                    "per_frame and left out of the mean", len(missing), len(scores), shown)
    return scores


def similarity_plot(scores: list[float | None], width: int = 768, height: int = 320) -> np.ndarray:
    """A line chart of the per-frame similarity (frames without a face are marked at the bottom)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 16, 28, height - 32
    lo, hi = -0.2, 1.0
    valid = [s for s in scores if s is not None]
    if valid:
        lo = min(lo, min(valid))

    def ypos(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    for v in np.arange(0.0, 1.01, 0.2):
        y = ypos(float(v))
        draw.line([(left, y), (right, y)], fill=(60, 60, 68))
        draw.text((6, y - 6), f"{v:.1f}", fill=(170, 170, 170), font=font)
    n = max(1, len(scores) - 1)

    def xpos(i: int) -> float:
        return left + (right - left) * (i / n if len(scores) > 1 else 0.5)

    points = [(xpos(i), ypos(s)) for i, s in enumerate(scores) if s is not None]
    if len(points) > 1:
        draw.line(points, fill=(90, 200, 255), width=2)
    for x, y in points:
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(90, 200, 255))
    for i, s in enumerate(scores):
        if s is None:
            x = xpos(i)
            draw.line([(x, bottom - 6), (x, bottom)], fill=(255, 90, 90), width=2)
    mean = float(np.mean(valid)) if valid else float("nan")
    if valid:
        draw.line([(left, ypos(mean)), (right, ypos(mean))], fill=(255, 200, 60))
    title = (f"ArcFace similarity to the reference face: mean {mean:.3f} over {len(valid)}/{len(scores)} frames"
             if valid else f"No face found in any of the {len(scores)} frames")
    draw.text((left, 8), title, fill=(230, 230, 230), font=font)
    draw.text((left, bottom + 10), "frame 0", fill=(170, 170, 170), font=font)
    draw.text((right - 60, bottom + 10), f"frame {len(scores) - 1}", fill=(170, 170, 170), font=font)
    return np.asarray(img, dtype=np.uint8)


class LynxFaceSimilarity:
    DESCRIPTION = ("Face resemblance of a video to the reference person (the paper's metric): ArcFace cosine "
                   "similarity of the face in every frame to the Lynx identity.")
    CATEGORY = "Lynx/face"
    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("mean_similarity", "per_frame", "plot")
    OUTPUT_TOOLTIPS = ("Mean cosine similarity over the frames where a face was found (0 when none was).",
                       "JSON list with one value per frame (null where no face was found).",
                       "A chart of the per-frame similarity.")
    FUNCTION = "score"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The decoded video frames (VAE Decode output)."}),
            "face": (LYNX_FACE, {"tooltip": "The identity to compare with (Lynx Encode Face ID)."}),
            "detector": (DETECTORS, {"default": "auto", "tooltip": _DETECTOR_TIP}),
        }}

    def score(self, images, face, detector):
        if getattr(face, "embedding", None) is None:
            raise ValueError("face: this identity has no embedding (no face was found in the photo); "
                             "use a photo with a visible face in Lynx Encode Face ID")
        check_finite(images, "images")
        scores = cosine_per_frame(make_analyzer(detector), to_uint8(images, "images"), face.embedding)
        valid = [s for s in scores if s is not None]
        mean = float(np.mean(valid)) if valid else 0.0
        plot = from_uint8(similarity_plot(scores)[None])
        return (mean, json.dumps([None if s is None else round(s, 6) for s in scores]), plot)
