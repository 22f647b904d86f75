"""ArcFace IR-SE50: facexlib key names, output shape and norm, batch independence, torch vs ONNX."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from lynx_core.face import ArcFaceEncoder, FaceAnalyzer, IRSE50, load_arcface
from lynx_core.face.arcface import preprocess_arcface
from lynx_core.face.align import align_arcface_112
from lynx_core.face.providers import OrtModel
from tests.conftest_face import (
    ASTRONAUT_KPS,
    astronaut,
    camera_rgb,
    models_root_with_arcface,
    random_arcface_onnx,
    random_arcface_pth,
)


@pytest.fixture(scope="module")
def model() -> IRSE50:
    return load_arcface(random_arcface_pth())


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    a, _ = align_arcface_112(astronaut(), ASTRONAUT_KPS)
    b, _ = align_arcface_112(camera_rgb(), ASTRONAUT_KPS)
    return np.stack([a, b])


def test_state_dict_uses_facexlib_backbone_names():
    sd = IRSE50().state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["input_layer.0.weight"] == (64, 3, 3, 3)
    assert shapes["input_layer.2.weight"] == (64,)  # PReLU
    assert shapes["output_layer.3.weight"] == (512, 25088)
    assert shapes["output_layer.4.running_var"] == (512,)
    # 24 units (3 + 4 + 14 + 3); a unit whose depth changes has a conv shortcut, the others a
    # parameter-free max-pool.
    units = {int(k.split(".")[1]) for k in sd if k.startswith("body.")}
    assert units == set(range(24))
    conv_shortcuts = sorted({int(k.split(".")[1]) for k in sd if ".shortcut_layer.0.weight" in k})
    assert conv_shortcuts == [3, 7, 21]
    assert shapes["body.3.shortcut_layer.0.weight"] == (128, 64, 1, 1)
    assert shapes["body.23.res_layer.5.fc1.weight"] == (32, 512, 1, 1)  # SE reduction 16
    assert shapes["body.0.res_layer.3.weight"] == (64, 64, 3, 3)
    assert len(sd) == 397
    assert sum(p.numel() for p in IRSE50().parameters()) == 43_797_696


def test_output_shape_unit_norm_and_batch_independence(model, crops):
    x = torch.from_numpy(preprocess_arcface(crops))
    with torch.no_grad():
        out = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, singles, atol=1e-5, rtol=0)
    assert float(out[0] @ out[1]) < 0.99  # different pictures give different vectors even with random weights


def test_preprocessing_is_rgb_crop_to_bgr_minus_one_to_one():
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[..., 0] = 255  # pure red
    x = preprocess_arcface(crop)
    assert x.shape == (1, 3, 112, 112) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 2], 1.0)  # red sits in the last (BGR) channel
    np.testing.assert_allclose(x[0, 0], -1.0)
    with pytest.raises(ValueError, match="112"):
        preprocess_arcface(np.zeros((2, 100, 100, 3), np.uint8))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_roundtrip_prefix_and_bad_files(tmp_path, model, crops):
    x = torch.from_numpy(preprocess_arcface(crops[:1]))
    prefixed = tmp_path / "dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, prefixed)
    with torch.no_grad():
        torch.testing.assert_close(load_arcface(prefixed)(x), model(x))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="not facexlib's ArcFace IR-SE50"):
        load_arcface(wrong)
    # weights_only=True refuses pickled code objects.
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"x": os.getcwd}, fh)
    with pytest.raises(ValueError, match="Could not read"):
        load_arcface(evil)
    with pytest.raises(FileNotFoundError, match="models/facexlib"):
        load_arcface(tmp_path / "missing.pth")


def test_onnx_export_matches_torch(model, crops):
    onnx_path = random_arcface_onnx()
    ort = OrtModel(onnx_path, ["CPUExecutionProvider"])
    x = preprocess_arcface(crops)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = ort(x)[0]
    assert out.shape == (2, 512)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # Dynamic batch: one at a time gives the same rows.
    np.testing.assert_allclose(ort(x[1:2])[0][0], out[1], atol=1e-5, rtol=0)


def test_encoder_backends_agree_and_onnx_export_is_made_once(crops):
    onnx_path = random_arcface_onnx()  # made by ArcFaceEncoder(backend="onnx") next to the weights
    pth = onnx_path.with_suffix(".pth")
    assert onnx_path.is_file() and pth.is_file()
    stamp = onnx_path.stat().st_mtime_ns
    torch_enc = ArcFaceEncoder(pth, backend="torch", device="cpu")
    onnx_enc = ArcFaceEncoder(pth, backend="onnx", device="cpu")  # finds and reuses the export
    assert onnx_enc.onnx_path == onnx_path and onnx_path.stat().st_mtime_ns == stamp
    a, b = torch_enc.encode(crops), onnx_enc.encode(crops)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert torch_enc.provider == "torch cpu" and onnx_enc.provider == "onnxruntime CPUExecutionProvider"


def test_analyzer_backends_give_the_same_identity():
    root = models_root_with_arcface()
    t = FaceAnalyzer("mtcnn", models_dirs=[root], arcface_backend="torch", device="cpu").encode(astronaut())
    o = FaceAnalyzer(
        "mtcnn", models_dirs=[root], arcface_backend="onnx", arcface_onnx_path=random_arcface_onnx(), device="cpu"
    ).encode(astronaut())
    torch.testing.assert_close(t.embedding, o.embedding, atol=1e-4, rtol=0)
    assert "onnxruntime" in o.provider and "torch" in t.provider


def test_missing_weights_error_says_where_to_put_the_file(tmp_path):
    fa = FaceAnalyzer("mtcnn", models_dirs=[tmp_path / "models"], device="cpu")
    with pytest.raises(FileNotFoundError) as info:
        fa.encode(astronaut())
    msg = str(info.value)
    assert "recognition_arcface_ir_se50.pth" in msg
    assert f"Put the file in {tmp_path / 'models' / 'facexlib'}" in msg


def test_onnx_backend_runs_from_the_onnx_file_alone(tmp_path, monkeypatch):
    """random IR-SE50 -> export by the analyzer -> delete the .pth -> the onnx backend still encodes."""
    from lynx_core.face import clear_face_cache

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # keep ~/.cache/comfyui-lynx out of the search
    models = tmp_path / "models"
    pth = models / "facexlib" / "recognition_arcface_ir_se50.pth"
    pth.parent.mkdir(parents=True)
    pth.symlink_to(random_arcface_pth())
    ref = FaceAnalyzer("mtcnn", models_dirs=[models], arcface_backend="torch", device="cpu").encode(astronaut())

    exported = pth.with_suffix(".onnx")
    assert not exported.exists()
    first = FaceAnalyzer("mtcnn", models_dirs=[models], arcface_backend="onnx", device="cpu")
    first.encode(astronaut())
    assert exported.is_file() and first.encoder.onnx_path == exported

    pth.unlink()
    clear_face_cache()
    fa = FaceAnalyzer("mtcnn", models_dirs=[models], arcface_backend="onnx", device="cpu")
    ident = fa.encode(astronaut())
    assert fa.encoder.weights is None and fa.encoder.onnx_path == exported
    assert "onnxruntime" in ident.provider
    torch.testing.assert_close(ident.embedding, ref.embedding, atol=1e-4, rtol=0)
    # The torch backend still needs the .pth and says so.
    with pytest.raises(FileNotFoundError, match="recognition_arcface_ir_se50.pth"):
        FaceAnalyzer("mtcnn", models_dirs=[models], arcface_backend="torch", device="cpu").encode(astronaut())


def test_onnx_backend_error_names_both_files_and_every_folder(tmp_path, monkeypatch):
    from lynx_core.face.paths import arcface_onnx_search_dirs, arcface_search_dirs

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    models = tmp_path / "models"
    fa = FaceAnalyzer("mtcnn", models_dirs=[models], arcface_backend="onnx", device="cpu")
    with pytest.raises(FileNotFoundError) as info:
        fa.encode(astronaut())
    msg = str(info.value)
    assert "recognition_arcface_ir_se50.pth" in msg and "recognition_arcface_ir_se50.onnx" in msg
    folders = set(arcface_search_dirs([models])) | set(arcface_onnx_search_dirs([models]))
    assert models / "facexlib" in folders and tmp_path / "home" / ".cache" / "comfyui-lynx" in folders
    for folder in folders:
        assert f"\n  {folder}\n" in msg + "\n", folder
    assert f"in {models / 'facexlib'}/" in msg
    # An explicit ONNX path that does not exist is named as such.
    bad = tmp_path / "nowhere.onnx"
    with pytest.raises(FileNotFoundError, match="nowhere.onnx does not exist"):
        FaceAnalyzer("mtcnn", models_dirs=[models], arcface_backend="onnx", arcface_onnx_path=bad,
                     device="cpu").encode(astronaut())
