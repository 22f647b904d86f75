"""Bad IMAGE inputs of the face nodes: NaN/inf pixels are named as such, the no-face error speaks
of the node's own widget and batch index, and Face Similarity sums missing faces up once per run."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import nodes.comfy_env as comfy_env
from lynx_core.face.analyzer import FaceAnalyzer
from lynx_core.face.types import NoFaceError
from nodes.face import LynxEncodeFaceID, LynxFaceSimilarity
from tests.conftest_face import astronaut, cat, models_root_with_arcface


@pytest.fixture()
def face_models(monkeypatch, tmp_path):
    root = models_root_with_arcface()
    monkeypatch.setattr(comfy_env, "models_root_dirs", lambda: [root])
    monkeypatch.setattr(comfy_env, "temp_directory", lambda: tmp_path / "temp")
    return root


def _image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).float().div(255.0)[None]


def encode(image, on_no_face="error"):
    return LynxEncodeFaceID().encode(image, "mtcnn", "largest", 0, "torch", on_no_face)["result"]


def test_nan_or_inf_in_the_photo_is_named_not_no_face(face_models):
    photo = _image(astronaut())
    batch = torch.cat([photo, photo.clone(), photo.clone()])
    batch[1, 10, 10, 0] = float("nan")
    batch[2, :2, :2, :] = float("inf")
    with pytest.raises(ValueError) as err:
        encode(batch)
    msg = str(err.value)
    assert msg.startswith("image: ") and "NaN or infinite" in msg
    assert "batch index 1 (1 values), 2 (12 values)" in msg and "of 3, 512x512" in msg
    assert "No face" not in msg and "Load Image" in msg
    # pass_through does not hide it either: the values are a bug upstream, not a missing face.
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode(batch, "pass_through")


def test_nan_frames_in_face_similarity_point_at_the_sampling(face_models):
    (face, _p, _a) = encode(_image(astronaut()))
    frames = _image(astronaut()).repeat(2, 1, 1, 1)
    frames[1] = float("nan")
    with pytest.raises(ValueError) as err:
        LynxFaceSimilarity().score(frames, face, "mtcnn")
    msg = str(err.value)
    assert msg.startswith("images: ") and "batch index 1" in msg and "VAE Decode" in msg and "diverged" in msg


def test_the_engine_names_non_finite_pixels_too():
    arr = astronaut().astype(np.float32) / 255.0
    arr[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="the input image: the picture contains 1 NaN or infinite value"):
        FaceAnalyzer(detector="mtcnn").encode(arr)


def test_no_face_error_speaks_of_the_node_widget_and_batch_index(face_models):
    photo = np.ascontiguousarray(astronaut()[:300, :451])  # the face is in the top-left part
    batch = torch.cat([_image(photo), _image(cat())])
    with pytest.raises(NoFaceError) as err:
        encode(batch)
    msg = str(err.value)
    assert msg.startswith("image: no face found in batch index 1 (of 2, 451x300)")
    assert "set on_no_face to pass_through on this node" in msg
    assert "Python API" not in msg and "'skip'" not in msg
    assert err.value.image_index == 1 and err.value.image_size == (451, 300)


def test_the_engine_keeps_its_own_python_wording():
    with pytest.raises(NoFaceError) as err:
        FaceAnalyzer(detector="mtcnn").encode(cat())
    msg = str(err.value)
    assert "on_no_face='skip'" in msg and "pass_through" not in msg
    assert err.value.image_size == (451, 300)


def test_face_similarity_warns_once_per_run(face_models, caplog):
    (face, _p, _a) = encode(_image(astronaut()))
    other = _image(cat())
    frames = torch.cat([other, torch.zeros_like(other), torch.full_like(other, 0.5), other])
    with caplog.at_level(logging.DEBUG):
        _mean, per_frame, _plot = LynxFaceSimilarity().score(frames, face, "mtcnn")
    assert json.loads(per_frame) == [None] * 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "no face found in 4 of 4 frame(s) (batch index 0, 1, 2, 3)" in warnings[0]


def test_face_index_error_names_the_widget_and_batch_index(face_models):
    with pytest.raises(Exception) as err:
        LynxEncodeFaceID().encode(_image(astronaut()), "mtcnn", "index", 3, "torch", "error")
    msg = str(err.value)
    assert msg.startswith("face_index: batch index 0: face index 3 requested but only 1 face(s)")
    assert "on_no_face to pass_through on this node" in msg
