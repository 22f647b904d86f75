"""Alignment: templates equal the spec's numbers, the similarity fit and the warp are right."""
from __future__ import annotations

import numpy as np
import pytest

from lynx_core.face import align as A
from tests.conftest_face import (
    ASTRONAUT_KPS,
    SPEC_EXTENDED_112,
    SPEC_REFERENCE_256,
    SPEC_TEMPLATE_112,
    astronaut,
)


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array(
        [[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]], dtype=np.float64
    )


def test_templates_equal_spec_numbers():
    np.testing.assert_allclose(A.ARCFACE_TEMPLATE_112, SPEC_TEMPLATE_112, atol=1e-6)
    np.testing.assert_allclose(A.arcface_template(112, extend=True), SPEC_EXTENDED_112, atol=1e-4)
    np.testing.assert_allclose(A.lynx_reference_template_256(), SPEC_REFERENCE_256, atol=1e-4)
    # The 256 rule is ratio 2 and +16 in x, applied to the extended 112 template.
    ext = np.asarray(SPEC_EXTENDED_112)
    np.testing.assert_allclose(A.lynx_reference_template_256(), ext * 2 + [16, 0], atol=2e-4)
    # Multiples of 112 scale without a shift.
    np.testing.assert_allclose(A.arcface_template(224), np.asarray(SPEC_TEMPLATE_112) * 2, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        A.arcface_template(100)


def test_similarity_recovers_known_transform():
    rng = np.random.default_rng(0)
    for _ in range(20):
        true = _similarity(rng.uniform(0.2, 3), rng.uniform(-60, 60), rng.uniform(-200, 200), rng.uniform(-200, 200))
        src = rng.uniform(0, 500, (5, 2))
        dst = A.transform_points(true, src)
        np.testing.assert_allclose(A.estimate_similarity(src, dst), true, atol=1e-9)


def test_similarity_matches_scikit_image_on_noisy_points():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(1)
    for _ in range(20):
        src = ASTRONAUT_KPS + rng.normal(0, 4, (5, 2)) + rng.uniform(-100, 100, 2)
        dst = np.asarray(SPEC_TEMPLATE_112, dtype=np.float64)
        if hasattr(SimilarityTransform, "from_estimate"):
            ref = SimilarityTransform.from_estimate(src, dst).params
        else:  # scikit-image < 0.26
            tf = SimilarityTransform()
            tf.estimate(src, dst)
            ref = tf.params
        np.testing.assert_allclose(A.estimate_similarity(src, dst), ref[:2], atol=1e-8)


def test_similarity_rejects_coincident_points():
    with pytest.raises(ValueError, match="Degenerate"):
        A.estimate_similarity(np.ones((5, 2)), np.asarray(SPEC_TEMPLATE_112))


def test_warp_identity_and_integer_shift_with_black_border():
    img = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    np.testing.assert_array_equal(A.warp_affine(img, ident, (50, 40)), img)
    shift = np.array([[1.0, 0, 7], [0, 1.0, -3]])  # content moves right 7, up 3
    out = A.warp_affine(img, shift, (50, 40))
    np.testing.assert_array_equal(out[:37, 7:], img[3:, :43])
    assert not out[:, :7].any() and not out[37:].any()


def test_warp_half_pixel_rounds_half_to_even_like_opencv():
    img = np.array([[[10], [13], [20], [0]]], dtype=np.uint8).repeat(2, axis=0)[:, :, 0]
    half = np.array([[1.0, 0, -0.5], [0, 1.0, 0]])  # each output samples between two inputs
    out = A.warp_affine(img, half, (3, 2))
    # 11.5 -> 12 (even), 16.5 -> 16 (even), 10.0 -> 10
    np.testing.assert_array_equal(out[0], [12, 16, 10])


def test_warp_places_points_where_the_matrix_says():
    # Bright Gaussian dots at the astronaut's landmarks; after warping, their intensity centroids
    # must sit at M @ point with sub-pixel accuracy.
    h, w = 300, 400
    yy, xx = np.mgrid[:h, :w]
    img = np.zeros((h, w), dtype=np.float64)
    for x, y in ASTRONAUT_KPS:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.2**2))
    for size, extend in ((112, False), (256, True)):
        m = A.estimate_similarity(ASTRONAUT_KPS, A.arcface_template(size, extend))
        out = A.warp_affine(img.astype(np.float32), m, size).astype(np.float64)
        oy, ox = np.mgrid[:size, :size]
        for px, py in A.transform_points(m, ASTRONAUT_KPS):
            win = (np.abs(ox - px) < 8) & (np.abs(oy - py) < 8)
            wsum = out[win].sum()
            cx, cy = (ox[win] * out[win]).sum() / wsum, (oy[win] * out[win]).sum() / wsum
            assert abs(cx - px) < 0.05 and abs(cy - py) < 0.05


def test_warp_matches_scikit_image_bilinear_inside_the_image():
    from skimage.transform import AffineTransform, warp

    img = astronaut()
    m = A.estimate_similarity(ASTRONAUT_KPS, A.arcface_template(256, extend=True))
    ours = A.warp_affine(img, m, 256).astype(np.int64)
    full = np.vstack([m, [0, 0, 1]])
    ref = warp(img, AffineTransform(matrix=np.linalg.inv(full)), output_shape=(256, 256), order=1, preserve_range=True)
    inside = ours.sum(axis=2) > 0
    diff = np.abs(ours - np.rint(ref).astype(np.int64))[inside]
    assert diff.max() <= 1
    assert inside.mean() > 0.9


def test_aligned_crops_have_spec_sizes_and_black_border():
    img = astronaut()
    crop112, m112 = A.align_arcface_112(img, ASTRONAUT_KPS)
    crop256, m256 = A.align_reference_256(img, ASTRONAUT_KPS)
    assert crop112.shape == (112, 112, 3) and crop112.dtype == np.uint8
    assert crop256.shape == (256, 256, 3) and crop256.dtype == np.uint8
    # A face at the picture's corner leaves the outside of the picture black.
    corner_kps = ASTRONAUT_KPS - ASTRONAUT_KPS.min(axis=0) + 2
    crop, _ = A.align_arcface_112(img, corner_kps)
    assert (crop[:5, :5] == 0).all()
    # Both fits are least squares onto their own templates: the 256 one maps the landmarks
    # onto the reference template as well as the 112 one maps them onto the ArcFace template
    # (same residual up to the template's scale).
    r112 = np.linalg.norm(A.transform_points(m112, ASTRONAUT_KPS) - A.ARCFACE_TEMPLATE_112, axis=1)
    r256 = np.linalg.norm(A.transform_points(m256, ASTRONAUT_KPS) - A.lynx_reference_template_256(), axis=1)
    np.testing.assert_allclose(r256, r112 * (2 * 0.8), rtol=1e-4)
