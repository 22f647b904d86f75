"""insightface-format packs: discovery in ComfyUI folders, our SCRFD decoding, the insightface route."""
from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lynx_core.face import FaceAnalyzer, FaceModelNotFoundError, clear_face_cache
from lynx_core.face.detectors import build_detector, parse_detector_spec
from lynx_core.face.paths import (
    find_arcface_weights,
    find_insightface_pack,
    insightface_roots,
    list_insightface_packs,
)
from lynx_core.face.scrfd import SCRFDDetector, decode_scrfd, letterbox
from tests.conftest_face import SCRFD_BOX_DIST, SCRFD_KPS_OFFSETS, make_recognition_stub_onnx, make_scrfd_onnx

CPU = ["CPUExecutionProvider"]


def _blue_square_image() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1280x960 black picture with a 64 px blue square; expected (bbox, kps) after decoding.

    The letterbox halves it to 640x480, so the square covers exactly the stride-32 cell at column
    10, row 5, whose anchor is (320, 160) in the network input, i.e. (640, 320) in the picture.
    """
    img = np.zeros((960, 1280, 3), dtype=np.uint8)
    img[320:384, 640:704, 2] = 255
    anchor = np.array([640.0, 320.0])
    unit = 32 / 0.5  # stride in picture pixels
    d = np.asarray(SCRFD_BOX_DIST) * unit
    bbox = np.array([anchor[0] - d[0], anchor[1] - d[1], anchor[0] + d[2], anchor[1] + d[3]])
    kps = anchor + np.asarray(SCRFD_KPS_OFFSETS).reshape(5, 2) * unit
    return img, bbox, kps


@pytest.fixture(scope="module")
def tiny_scrfd(tmp_path_factory) -> Path:
    return make_scrfd_onnx(tmp_path_factory.mktemp("scrfd") / "det_10g.onnx")


def test_decoder_returns_the_known_detection(tiny_scrfd):
    img, bbox, kps = _blue_square_image()
    det = SCRFDDetector(tiny_scrfd, CPU)
    faces = det.detect(img)
    assert len(faces) == 1  # the two anchors of the cell are merged by NMS
    np.testing.assert_allclose(faces[0].bbox, bbox, atol=1e-3)
    np.testing.assert_allclose(faces[0].kps, kps, atol=1e-3)
    assert faces[0].score == pytest.approx((255 - 127.5) / 128, abs=1e-4)
    assert det.provider == "CPUExecutionProvider"


def test_detector_sees_the_channel_order_the_official_pipeline_feeds(tiny_scrfd):
    # Lynx gives insightface an RGB array, insightface swaps R and B for the network: blob channel 0
    # is the picture's blue. A blue square therefore fires channel 0, a red one does not...
    img, _, _ = _blue_square_image()
    red = img[:, :, ::-1].copy()
    path = tiny_scrfd
    lynx = SCRFDDetector(path, CPU)
    assert len(lynx.detect(img)) == 1 and len(lynx.detect(red)) == 0
    # ...while insightface's documented BGR convention would see red in channel 0.
    textbook = SCRFDDetector(path, CPU, lynx_channel_order=False)
    assert len(textbook.detect(red)) == 1 and len(textbook.detect(img)) == 0
    blob, scale = lynx.blob(img)
    assert blob.shape == (1, 3, 640, 640) and scale == 0.5
    assert blob[0, 0, 170, 330] == pytest.approx((255 - 127.5) / 128)
    assert blob[0, 2, 170, 330] == pytest.approx(-127.5 / 128)
    assert np.allclose(blob[0, :, 480:, :], -127.5 / 128)  # letterbox padding is black


def test_letterbox_keeps_aspect_and_pads_bottom_right():
    tall = np.full((1000, 500, 3), 200, np.uint8)
    canvas, scale = letterbox(tall, (640, 640))
    assert scale == 0.64 and (canvas[:, 320:] == 0).all() and (canvas[:, :320] == 200).all()


def test_decode_scrfd_on_raw_arrays():
    # 5-stride, 1-anchor layout (15 outputs) with one positive at stride 16, cell (row 2, col 3).
    size = 128
    outs_scores, outs_boxes, outs_kps = [], [], []
    for s in (8, 16, 32, 64, 128):
        n = (size // s) ** 2
        sc = np.zeros((n, 1), np.float32)
        if s == 16:
            sc[2 * (size // s) + 3] = 0.9
        outs_scores.append(sc)
        outs_boxes.append(np.ones((n, 4), np.float32))
        outs_kps.append(np.tile(np.arange(10, dtype=np.float32) / 10, (n, 1))[None])  # with a batch axis
    scores, boxes, kps = decode_scrfd(outs_scores + outs_boxes + outs_kps, (size, size), 0.5)
    assert scores.tolist() == pytest.approx([0.9])
    np.testing.assert_allclose(boxes[0], [48 - 16, 32 - 16, 48 + 16, 32 + 16])
    np.testing.assert_allclose(kps[0], np.array([48, 32]) + (np.arange(10) / 10 * 16).reshape(5, 2), atol=1e-5)
    with pytest.raises(ValueError, match="outputs"):
        decode_scrfd(outs_scores[:4], (size, size), 0.5)


def _comfy_models(tmp: Path) -> Path:
    return tmp / "ComfyUI" / "models"


def test_pack_found_in_comfyui_folder_and_auto_picks_it(tmp_path, tiny_scrfd):
    models = _comfy_models(tmp_path)
    pack = models / "insightface" / "models" / "buffalo_l"
    make_recognition_stub_onnx(pack / "w600k_r50.onnx")
    (pack / "det_10g.onnx").write_bytes(tiny_scrfd.read_bytes())
    loc = find_insightface_pack("buffalo_l", [models])
    assert loc.folder == pack and loc.detector.name == "det_10g.onnx" and not loc.nested
    # The same pack is found when the caller passes models/insightface itself.
    assert find_insightface_pack("buffalo_l", [models / "insightface"]).folder == pack
    assert list_insightface_packs([models]) == ["buffalo_l"]

    fa = FaceAnalyzer("auto", models_dirs=[models], insightface_backend="builtin", device="cpu")
    img, bbox, _ = _blue_square_image()
    faces = fa.detect(img)
    assert fa.detector.name == "insightface:buffalo_l"
    assert len(faces) == 1 and np.allclose(faces[0].bbox, bbox, atol=1e-3)


def test_nested_antelopev2_folder_is_accepted(tmp_path, tiny_scrfd):
    models = _comfy_models(tmp_path)
    nested = models / "insightface" / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "scrfd_10g_bnkps.onnx").write_bytes(tiny_scrfd.read_bytes())
    make_recognition_stub_onnx(nested / "glintr100.onnx")
    loc = find_insightface_pack("antelopev2", [models])
    assert loc.nested and loc.folder == nested and loc.detector.name == "scrfd_10g_bnkps.onnx"
    det = build_detector("insightface:antelopev2", [models], CPU, backend="builtin")
    assert len(det.detect(_blue_square_image()[0])) == 1


def test_detector_found_by_its_outputs_when_the_name_is_unknown(tmp_path, tiny_scrfd):
    pack = tmp_path / "my_pack"
    make_recognition_stub_onnx(pack / "aaa_recognition.onnx")
    (pack / "zzz_model.onnx").write_bytes(tiny_scrfd.read_bytes())
    loc = find_insightface_pack(str(pack))
    assert loc.detector.name == "zzz_model.onnx"


def test_missing_pack_error_lists_every_place_and_the_fix(tmp_path):
    models = _comfy_models(tmp_path)
    (models / "insightface" / "models" / "buffalo_l").mkdir(parents=True)  # empty: a failed unzip
    with pytest.raises(FaceModelNotFoundError) as info:
        find_insightface_pack("buffalo_l", [models])
    msg = str(info.value)
    for root in insightface_roots([models]):
        assert str(root / "buffalo_l") in msg
    assert str(Path.home() / ".insightface" / "models" / "buffalo_l") in msg
    assert "no .onnx files" in msg and "buffalo_l.zip" in msg and "mtcnn" in msg


def test_auto_falls_back_to_mtcnn_without_packs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # hide any real ~/.insightface
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    det = build_detector("auto", [tmp_path / "models"], CPU)
    assert det.name == "mtcnn"


def test_detector_spec_parsing():
    assert parse_detector_spec("auto") == ("auto", None)
    assert parse_detector_spec("MTCNN") == ("mtcnn", None)
    assert parse_detector_spec("insightface:antelopev2") == ("insightface", "antelopev2")
    assert parse_detector_spec("buffalo_l") == ("insightface", "buffalo_l")
    with pytest.raises(ValueError, match="pack name"):
        parse_detector_spec("insightface:")


def test_arcface_weights_search_order_and_error(tmp_path):
    models = _comfy_models(tmp_path)
    with pytest.raises(FaceModelNotFoundError) as info:
        find_arcface_weights([models])
    msg = str(info.value)
    assert str(models / "facexlib" / "recognition_arcface_ir_se50.pth") in msg
    assert "ComfyUI-WanVideoWrapper" in msg and "releases/download/v0.1.0" in msg
    assert f"Put the file in {models / 'facexlib'}" in msg
    wrapper = tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-WanVideoWrapper" / "lynx" / "face" / "facexlib" / "weights"
    wrapper.mkdir(parents=True)
    (wrapper / "recognition_arcface_ir_se50.pth").write_bytes(b"x")
    assert find_arcface_weights([models]).parent == wrapper
    own = models / "facexlib" / "recognition_arcface_ir_se50.pth"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"x")
    assert find_arcface_weights([models]) == own  # models/facexlib comes first
    with pytest.raises(FaceModelNotFoundError, match="does not exist"):
        find_arcface_weights([models], explicit=tmp_path / "nope.pth")


class _FakeInsightDetector:
    taskname = "detection"

    def __init__(self, path: str, providers: list) -> None:
        self.path, self.providers = path, providers
        self.seen: list[np.ndarray] = []
        self.session = types.SimpleNamespace(get_providers=lambda: list(providers))

    def prepare(self, ctx_id, **kwargs):
        self.prepared = (ctx_id, kwargs)

    def detect(self, img, max_num=0, metric="default"):
        self.seen.append(img)
        return (
            np.array([[300, 20, 400, 140, 0.8], [10, 20, 110, 140, 0.9]], np.float32),
            np.array([[[330, 60]] * 5, [[30, 60]] * 5], np.float32),
        )


def test_insightface_route_gets_the_rgb_array_and_lynx_settings(tmp_path, tiny_scrfd, monkeypatch):
    made: list[_FakeInsightDetector] = []
    fake = types.ModuleType("insightface")
    fake.__spec__ = importlib.machinery.ModuleSpec("insightface", None, is_package=True)
    fake.__path__ = []  # type: ignore[attr-defined]
    zoo = types.ModuleType("insightface.model_zoo")

    def get_model(path, providers=None, **kwargs):
        made.append(_FakeInsightDetector(path, providers))
        return made[-1]

    zoo.get_model = get_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "insightface", fake)
    monkeypatch.setitem(sys.modules, "insightface.model_zoo", zoo)
    try:
        models = _comfy_models(tmp_path)
        pack = models / "insightface" / "models" / "buffalo_l"
        pack.mkdir(parents=True)
        (pack / "det_10g.onnx").write_bytes(tiny_scrfd.read_bytes())
        fa = FaceAnalyzer("insightface:buffalo_l", models_dirs=[models], device="cpu")
        img = np.random.default_rng(0).integers(0, 255, (200, 500, 3), dtype=np.uint8)
        faces = fa.detect(img)
        (model,) = made
        assert Path(model.path) == pack / "det_10g.onnx" and model.providers == CPU
        assert model.prepared == (-1, {"input_size": (640, 640), "det_thresh": 0.5})
        np.testing.assert_array_equal(model.seen[0], img)  # RGB, not swapped: the official quirk
        assert [f.score for f in faces] == pytest.approx([0.9, 0.8])  # sorted left to right
        assert "insightface" in fa.detector.describe()
    finally:
        clear_face_cache()


def test_providers_cuda_first_only_when_torch_sees_a_gpu(monkeypatch):
    import onnxruntime
    import torch

    from lynx_core.face import providers as P

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.default_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert P.default_providers() == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert P.default_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert P.default_providers("cpu") == ["CPUExecutionProvider"]
    # A CPU-only onnxruntime next to a CUDA torch: CPU, never an error.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert P.default_providers() == ["CPUExecutionProvider"]


def test_broken_onnxruntime_install_is_explained(monkeypatch):
    from lynx_core.face.providers import import_onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))  # no InferenceSession
    with pytest.raises(ImportError, match="installed together"):
        import_onnxruntime()
