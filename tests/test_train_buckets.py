"""Buckets, media reading/cropping and the tiny stand-in encoders (no face models: fast)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lynx_core.train.buckets import (
    bucket_batches,
    bucket_tokens,
    describe_buckets,
    frames_to_use,
    group_by_bucket,
    latent_bucket,
    resolution_for,
)
from lynx_core.train.media import MediaError, read_frames, resize_center_crop
from lynx_core.train.tiny_encoders import TinyTextEncoder, TinyVAE
from lynx_core.video import write_video


@pytest.mark.parametrize("available,max_frames,stride,expected", [
    (1, 81, 1, 1), (4, 81, 1, 1), (5, 81, 1, 5), (10, 81, 1, 9), (200, 81, 1, 81), (200, 33, 1, 33),
    (20, 81, 2, 9),   # every 2nd frame: 10 frames -> 9
    (17, 81, 4, 5),   # 0,4,8,12,16 -> 5
    (0, 81, 1, 0),
])
def test_frames_to_use_is_the_largest_4k_plus_1(available, max_frames, stride, expected):
    n = frames_to_use(available, max_frames, stride)
    assert n == expected and (n == 0 or (n - 1) % 4 == 0)


def test_frame_settings_are_checked():
    with pytest.raises(ValueError, match="max_frames = 80 is not of the form 4k\\+1; use 77 or 81"):
        frames_to_use(100, 80)
    with pytest.raises(ValueError, match="frame_stride = 0"):
        frames_to_use(100, 81, 0)


def test_latent_bucket_and_tokens():
    assert latent_bucket(81, 480, 832) == (21, 60, 104)
    assert latent_bucket(1, 256, 256) == (1, 32, 32)
    assert bucket_tokens((21, 60, 104)) == 21 * 30 * 52
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_bucket(80, 480, 832)


def test_resolution_from_a_list_picks_the_closest_aspect():
    res = [[480, 832], [832, 480], [624, 624]]
    assert resolution_for(1080, 1920, res) == (480, 832)   # landscape
    assert resolution_for(1920, 1080, res) == (832, 480)   # portrait
    assert resolution_for(500, 520, res) == (624, 624)     # near square
    with pytest.raises(ValueError, match="multiples of 16"):
        resolution_for(100, 100, [[100, 100]])


def test_resolution_from_an_area_keeps_the_aspect_on_16_px_steps():
    h, w = resolution_for(1080, 1920, pixel_area=480 * 832)
    assert h % 16 == 0 and w % 16 == 0
    assert abs(w / h - 16 / 9) < 0.05 and abs(h * w - 480 * 832) / (480 * 832) < 0.05
    assert resolution_for(300, 300, pixel_area=256 * 256) == (256, 256)


def test_bucket_batches_are_deterministic_same_shape_and_complete():
    buckets = [(1, 32, 32)] * 7 + [(3, 32, 32)] * 5 + [(1, 32, 48)] * 3
    a = bucket_batches(buckets, 2, seed=0, epoch=0)
    assert a == bucket_batches(buckets, 2, seed=0, epoch=0)
    assert a != bucket_batches(buckets, 2, seed=0, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(15))
    assert all(len({buckets[i] for i in b}) == 1 for b in a)
    full = bucket_batches(buckets, 2, seed=0, drop_last=True)
    assert all(len(b) == 2 for b in full) and len(full) == 3 + 2 + 1
    assert list(group_by_bucket(buckets)) == [(1, 32, 32), (3, 32, 32), (1, 32, 48)]
    assert "(3, 32, 32) -> 9x256x256: 5, 768" in describe_buckets(buckets)


def test_resize_center_crop_covers_and_centres():
    img = np.zeros((1, 100, 200, 3), np.uint8)
    img[:, 40:60, 90:110] = 255  # a white square in the middle
    out = resize_center_crop(img, 64, 64)
    assert out.shape == (1, 64, 64, 3) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[0, :, :, 0] > 128)
    assert abs(ys.mean() - 31.5) < 1 and abs(xs.mean() - 31.5) < 1  # still centred
    assert 10 <= ys.max() - ys.min() + 1 <= 15  # scaled by 0.64, not stretched
    assert resize_center_crop(img, 100, 200) is img


def test_read_frames_images_and_videos(tmp_path: Path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    frames = read_frames(tmp_path / "a.png")
    assert frames.shape == (1, 24, 40, 3) and (frames[0] == img).all()
    clip = np.stack([np.full((32, 48, 3), 8 * i, np.uint8) for i in range(12)])
    write_video(clip, tmp_path / "c.mp4", fps=8, crf=0)
    got = read_frames(tmp_path / "c.mp4", frames_needed=5)
    assert got.shape == (5, 32, 48, 3)
    assert np.abs(got[:, 0, 0, 0].astype(int) - 8 * np.arange(5)).max() <= 3
    assert read_frames(tmp_path / "c.mp4").shape[0] == 12
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(MediaError, match="bad.png"):
        read_frames(tmp_path / "bad.png")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(MediaError, match="neither an image"):
        read_frames(tmp_path / "x.txt")


def test_tiny_vae_shapes_determinism_and_causal_first_frame():
    vae = TinyVAE(seed=0)
    frames = np.random.default_rng(0).integers(0, 255, (9, 64, 32, 3), dtype=np.uint8)
    lat = vae(frames)
    assert lat.shape == (16, 3, 8, 4) and lat.dtype == torch.float32
    torch.testing.assert_close(lat, TinyVAE(seed=0)(torch.from_numpy(frames)))
    assert not torch.allclose(lat, TinyVAE(seed=1)(frames))
    changed = frames.copy()
    changed[0] = 255 - changed[0]
    d = (vae(changed) - lat).abs().amax(dim=(0, 2, 3))
    assert d[0] > 0.1 and d[1:].max() == 0  # frame 0 only reaches latent frame 0
    changed = frames.copy()
    changed[5] = 255 - changed[5]
    d = (vae(changed) - lat).abs().amax(dim=(0, 2, 3))
    assert d[2] > 0.01 and d[0] == 0 and d[1] == 0  # frames 1-4 -> latent 1, frames 5-8 -> latent 2
    assert vae(frames[:1]).shape == (16, 1, 8, 4)
    with pytest.raises(ValueError, match="divisible by 8"):
        vae(frames[:, :60])


def test_tiny_text_encoder_is_per_word_and_trimmed():
    te = TinyTextEncoder(dim=32)
    a = te("A woman smiles")
    assert a.shape == (4, 32)
    b = te("the woman, smiles!")
    torch.testing.assert_close(a[1:], b[1:])  # same words, same rows; the end row is shared
    assert not torch.allclose(a[0], b[0])
    assert te("").shape == (1, 32)
    torch.testing.assert_close(te("").squeeze(0), a[-1])
    assert TinyTextEncoder(dim=32, seed=1)("a").ne(te("a")).any()
