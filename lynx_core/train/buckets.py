"""Buckets: which frame count and resolution a target is trained at, and grouping samples by shape.

A bucket is the latent grid ``(frames, height, width)`` of the Wan VAE: pixel frames ``4k+1``
become ``k+1`` latent frames (the first frame alone, then 4 per latent frame), pixels shrink by 8.
Samples of one bucket stack into a batch; packing (paper 3.2.1) mixes buckets in one sequence.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Iterable, Sequence

__all__ = [
    "Bucket",
    "VAE_SPATIAL",
    "VAE_TEMPORAL",
    "frames_to_use",
    "check_frame_count",
    "latent_bucket",
    "bucket_tokens",
    "resolution_for",
    "group_by_bucket",
    "bucket_batches",
    "describe_buckets",
]

Bucket = tuple[int, int, int]  # latent (frames, height, width)
VAE_SPATIAL = 8
VAE_TEMPORAL = 4


def check_frame_count(max_frames: int) -> None:
    """Wan's VAE needs 4k+1 pixel frames; refuse any other maximum with the nearest valid values."""
    if max_frames < 1 or (max_frames - 1) % VAE_TEMPORAL:
        lower = max(1, (max_frames - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1)
        raise ValueError(f"max_frames = {max_frames} is not of the form 4k+1; use {lower} or {lower + VAE_TEMPORAL}.")


def frames_to_use(available: int, max_frames: int, stride: int = 1) -> int:
    """How many frames (after taking every ``stride``-th) a clip of ``available`` frames trains with.

    The largest 4k+1 that is <= both the strided length and ``max_frames``; 0 when the clip is empty.
    """
    if stride < 1:
        raise ValueError(f"frame_stride = {stride} must be >= 1.")
    check_frame_count(max_frames)
    if available <= 0:
        return 0
    strided = (available - 1) // stride + 1
    n = min(strided, max_frames)
    return (n - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1


def latent_bucket(frames: int, height: int, width: int) -> Bucket:
    """Pixel (frames 4k+1, height, width) -> latent (k+1, height/8, width/8)."""
    if (frames - 1) % VAE_TEMPORAL or height % VAE_SPATIAL or width % VAE_SPATIAL:
        raise ValueError(f"({frames}, {height}, {width}) is not a Wan VAE size: frames must be 4k+1 and "
                         f"height/width multiples of {VAE_SPATIAL}.")
    return ((frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL)


def bucket_tokens(bucket: Sequence[int], patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """Patch tokens of one sample of this latent bucket (Wan patchifies 1x2x2)."""
    return math.prod(b // p for b, p in zip(bucket, patch_size))


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def resolution_for(height: int, width: int, resolutions: Sequence[Sequence[int]] | None = None,
                   pixel_area: int | None = None, multiple: int = 16) -> tuple[int, int]:
    """The (height, width) a picture of this size trains at.

    With ``resolutions`` (a list of (h, w)): the one whose aspect ratio is closest to the picture's in
    log space (ties: the larger area, then list order). Otherwise about ``pixel_area`` pixels with the
    picture's aspect, both sides multiples of ``multiple``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"picture size {width}x{height} is empty.")
    aspect = math.log(width / height)
    if resolutions:
        for r in resolutions:
            if len(r) != 2 or r[0] % multiple or r[1] % multiple or r[0] <= 0 or r[1] <= 0:
                raise ValueError(f"resolution {list(r)} in resolutions must be [height, width] with both "
                                 f"positive multiples of {multiple}.")
        best = min(enumerate(resolutions),
                   key=lambda ir: (abs(math.log(ir[1][1] / ir[1][0]) - aspect), -ir[1][0] * ir[1][1], ir[0]))[1]
        return int(best[0]), int(best[1])
    if not pixel_area or pixel_area < multiple * multiple:
        raise ValueError(f"pixel_area = {pixel_area} must be at least {multiple * multiple} (or give resolutions).")
    w = math.sqrt(pixel_area * width / height)
    h = math.sqrt(pixel_area * height / width)
    return _round_to(h, multiple), _round_to(w, multiple)


def group_by_bucket(buckets: Iterable[Sequence[int]]) -> dict[Bucket, list[int]]:
    """Indices grouped by bucket, in first-seen bucket order and index order within each."""
    groups: dict[Bucket, list[int]] = defaultdict(list)
    for i, b in enumerate(buckets):
        groups[tuple(int(x) for x in b)].append(i)  # type: ignore[index]
    return dict(groups)


def bucket_batches(buckets: Sequence[Sequence[int]], batch_size: int, seed: int, epoch: int = 0,
                   drop_last: bool = False) -> list[list[int]]:
    """One epoch of same-bucket batches in a deterministic order (same seed and epoch, same batches).

    Indices are shuffled within each bucket, cut into batches, and the batches shuffled across buckets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be >= 1.")
    rng = random.Random(f"{seed}:{epoch}")
    batches: list[list[int]] = []
    for bucket, idx in sorted(group_by_bucket(buckets).items()):
        idx = list(idx)
        rng.shuffle(idx)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            if drop_last and len(chunk) < batch_size:
                continue
            batches.append(chunk)
    rng.shuffle(batches)
    return batches


def describe_buckets(buckets: Sequence[Sequence[int]], patch_size: Sequence[int] = (1, 2, 2)) -> str:
    """A small table (latent bucket, pixel size, samples, tokens per sample) for logs and plans."""
    groups = group_by_bucket(buckets)
    lines = ["bucket (latent F,h,w) -> pixels (frames x H x W): samples, tokens/sample"]
    for b, idx in sorted(groups.items()):
        f, h, w = b
        pixels = f"{(f - 1) * VAE_TEMPORAL + 1}x{h * VAE_SPATIAL}x{w * VAE_SPATIAL}"
        lines.append(f"  {b} -> {pixels}: {len(idx)}, {bucket_tokens(b, patch_size)}")
    return "\n".join(lines)
