"""Face alignment: ArcFace templates, similarity fit and an OpenCV-compatible affine warp.

Lynx makes two crops from the same 5 landmarks (spec section 5.1 and 6.2):

* the 112x112 ArcFace crop (the standard template, ratio 1, no shift), fed to IR-SE50;
* the 256x256 reference crop: the template moved down by 10 px and shrunk by 0.8 about
  (56, 56), then mapped to 256 with insightface's rule for sizes that are multiples of 128
  (ratio 256/128 = 2 and an x shift of 8 * ratio = 16).

The official code fits a scikit-image ``SimilarityTransform`` (Umeyama least squares) and warps
with ``cv2.warpAffine`` (bilinear, constant black border). Both are re-implemented here so that
the default path needs neither OpenCV nor a particular scikit-image API version.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "arcface_template",
    "lynx_reference_template_256",
    "estimate_similarity",
    "transform_points",
    "warp_affine",
    "align_arcface_112",
    "align_reference_256",
    "align_face",
]

# Order: image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner.
ARCFACE_TEMPLATE_112: np.ndarray = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
ARCFACE_TEMPLATE_112.setflags(write=False)


def arcface_template(size: int = 112, extend: bool = False, extend_ratio: float = 0.8) -> np.ndarray:
    """The 5-point destination template for a ``size`` x ``size`` crop, as insightface/Lynx build it.

    ``extend`` applies Lynx's reference-crop change (y + 10, then scale by ``extend_ratio`` about
    (56, 56)) before the size rule. The size rule follows insightface ``estimate_norm``: multiples
    of 112 scale by size/112; other multiples of 128 scale by size/128 and shift x by 8 * ratio.
    """
    base = ARCFACE_TEMPLATE_112.astype(np.float64)
    if extend:
        base = base + np.array([0.0, 10.0])
        base = (base - 56.0) * extend_ratio + 56.0
    if size % 112 == 0:
        ratio, diff_x = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(
            f"Crop size {size} is not supported: the ArcFace template rule needs a multiple of 112 or 128."
        )
    return (base * ratio + np.array([diff_x, 0.0])).astype(np.float32)


def lynx_reference_template_256() -> np.ndarray:
    """Destination points of the 256 px Lynx reference crop (spec 5.1 step 3)."""
    return arcface_template(256, extend=True, extend_ratio=0.8)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama's closed form, the estimator behind scikit-image ``SimilarityTransform``. Returns the
    2x3 float64 matrix ``M`` with ``dst ~= M[:, :2] @ src + M[:, 2]``.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"Need matching point sets of at least 2 points, got {src.shape} and {dst.shape}.")
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    signs = np.ones(2)
    if np.linalg.det(cov) < 0:
        signs[1] = -1.0
    u, sing, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    src_var = (src_c**2).sum() / n
    if rank == 0 or src_var <= 0:
        raise ValueError("Degenerate landmarks: all points coincide, no similarity transform exists.")
    if rank == 1:
        # Collinear points: keep a proper rotation (no reflection) as Umeyama prescribes.
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            flip = np.array([1.0, -1.0])
            rot = u @ np.diag(flip) @ vt
            signs = flip
    else:
        rot = u @ np.diag(signs) @ vt
    scale = float(sing @ signs) / src_var
    m = np.zeros((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * (rot @ src_mean)
    return m


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to [N, 2] points."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(m, dtype=np.float64)[:, :2].T + np.asarray(m, dtype=np.float64)[:, 2]


def _invert_affine(m: np.ndarray) -> np.ndarray:
    # Same closed form as OpenCV (singular matrices map everything to the origin instead of failing).
    a, b, c = m[0]
    d, e, f = m[1]
    det = a * e - b * d
    inv_det = 1.0 / det if det != 0 else 0.0
    ia, ib = e * inv_det, -b * inv_det
    id_, ie = -d * inv_det, a * inv_det
    return np.array([[ia, ib, -ia * c - ib * f], [id_, ie, -id_ * c - ie * f]], dtype=np.float64)


def warp_affine(image: np.ndarray, m: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Warp ``image`` [H, W, C] (or [H, W]) with the forward 2x3 matrix ``m`` into ``size`` (w, h).

    Reproduces ``cv2.warpAffine(image, m, (w, h))`` with its defaults (bilinear, constant border 0)
    as OpenCV >= 4.11 computes it (the version the official code pins): the inverse matrix is
    rounded to float32, source coordinates and the two-step lerp are evaluated in float32 (with
    the fused multiply-add of its SIMD kernel), a neighbour outside the image counts as 0, and
    uint8 results are rounded half to even. Checked bit-exact against opencv-python-headless 5.0.
    """
    if isinstance(size, (int, np.integer)):
        out_w = out_h = int(size)
    else:
        out_w, out_h = int(size[0]), int(size[1])
    img = np.asarray(image)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[:, :, None]
    if img.ndim != 3:
        raise ValueError(f"warp_affine expects an [H, W] or [H, W, C] image, got shape {img.shape}.")
    h, w, _ = img.shape
    inv = _invert_affine(np.asarray(m, dtype=np.float64).reshape(2, 3)).astype(np.float32)

    f32, f64 = np.float32, np.float64
    xs = np.arange(out_w, dtype=f64)[None, :]
    ys = np.arange(out_h, dtype=f32)[:, None]
    # OpenCV's vector kernel forms the row base in float32, then adds x * M with a fused
    # multiply-add (one rounding). x * M is exact in float64, so f64 add + one f32 rounding = fma.
    base_x = (ys * inv[0, 1]).astype(f32) + inv[0, 2]
    base_y = (ys * inv[1, 1]).astype(f32) + inv[1, 2]
    sx = (xs * f64(inv[0, 0]) + base_x.astype(f64)).astype(f32)
    sy = (xs * f64(inv[1, 0]) + base_y.astype(f64)).astype(f32)
    ix = np.floor(sx)
    iy = np.floor(sy)
    ax = (sx - ix)[:, :, None]
    ay = (sy - iy)[:, :, None]
    ix = ix.astype(np.int64)
    iy = iy.astype(np.int64)

    def fetch(dy: int, dx: int) -> np.ndarray:
        px, py = ix + dx, iy + dy
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        vals = img[np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)].astype(f32)
        return vals * inside[:, :, None].astype(f32)

    p00, p01, p10, p11 = fetch(0, 0), fetch(0, 1), fetch(1, 0), fetch(1, 1)
    # Each lerp step is a fused multiply-add in OpenCV's kernel: compute in float64, round once.
    top = (p00.astype(f64) + ax.astype(f64) * (p01 - p00).astype(f64)).astype(f32)
    bottom = (p10.astype(f64) + ax.astype(f64) * (p11 - p10).astype(f64)).astype(f32)
    out = (top.astype(f64) + ay.astype(f64) * (bottom - top).astype(f64)).astype(f32)
    if img.dtype == np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    else:
        out = out.astype(img.dtype)
    return out[:, :, 0] if squeeze else out


def align_face(image: np.ndarray, kps: np.ndarray, size: int, extend: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-align ``image`` so that ``kps`` land on the template for ``size``; returns (crop, M)."""
    kps = np.asarray(kps, dtype=np.float32).reshape(5, 2)
    m = estimate_similarity(kps, arcface_template(size, extend=extend))
    return warp_affine(image, m, size), m


def align_arcface_112(image: np.ndarray, kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 112x112 ArcFace input crop (insightface ``norm_crop``), returned with its 2x3 matrix."""
    return align_face(image, kps, 112, extend=False)


def align_reference_256(image: np.ndarray, kps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 256x256 Lynx reference crop (official ``align_face`` with extend 0.8), with its matrix."""
    return align_face(image, kps, 256, extend=True)
