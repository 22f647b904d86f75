"""Video writing/reading round trips for every format, metadata, odd sizes and output naming."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lynx_core.video import FORMATS, next_free_path, probe, read_video, to_uint8_frames, write_video


def _smooth_clip(frames=8, height=32, width=48) -> np.ndarray:
    """Float [F,H,W,3] in [0,1]: soft moving gradients that every codec keeps well."""
    t = np.linspace(0, 1, frames)[:, None, None]
    y = np.linspace(0, 1, height)[None, :, None]
    x = np.linspace(0, 1, width)[None, None, :]
    r = 0.5 + 0.35 * np.sin(2 * np.pi * (x + 0.5 * t)) + 0 * y
    g = 0.5 + 0.35 * np.cos(2 * np.pi * (y - 0.5 * t)) + 0 * x
    b = 0.25 + 0.5 * x * y + 0.1 * t
    return np.stack([r, g, b], axis=-1).astype(np.float32)


# GIF uses a 256-colour palette per frame and lossy webp/h264/vp9 blur slightly.
MAX_MEAN_ABS_ERROR = {"mp4": 6.0, "webm": 6.0, "webp": 6.0, "gif": 8.0}


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_each_format(tmp_path, fmt):
    clip = _smooth_clip()
    path = write_video(clip, tmp_path / f"clip.{fmt}", fps=16)
    assert path == tmp_path / f"clip.{fmt}" and path.is_file()
    frames = read_video(path)
    assert frames.dtype == np.uint8 and frames.shape == (8, 32, 48, 3)
    info = probe(path)
    assert (info["frames"], info["width"], info["height"]) == (8, 48, 32)
    assert info["fps"] == pytest.approx(16.0, rel=0.05)  # gif stores 10 ms units: 60 ms ≈ 16.7 fps
    assert info["codec"] == {"mp4": "h264", "webm": "vp9", "webp": "webp", "gif": "gif"}[fmt]
    expected = to_uint8_frames(clip).astype(np.float64)
    err = np.abs(frames.astype(np.float64) - expected).mean()
    assert err < MAX_MEAN_ABS_ERROR[fmt]
    # frames stay in order: each decoded frame is closest to its own source frame
    for k in range(8):
        dists = [np.abs(frames[k].astype(np.float64) - expected[j]).mean() for j in range(8)]
        assert int(np.argmin(dists)) == k


@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_sizes(tmp_path, fmt):
    clip = _smooth_clip(frames=5, height=31, width=45)
    path = write_video(clip, tmp_path / "odd", fps=8, format=fmt)
    assert path.suffix == f".{fmt}"
    frames = read_video(path)
    if fmt in ("mp4", "webm"):
        # padded to even by repeating the last row/column
        assert frames.shape == (5, 32, 46, 3)
        edge_err = np.abs(frames[:, -1].astype(int) - frames[:, -2].astype(int)).mean()
        assert edge_err < 6.0
    else:
        assert frames.shape == (5, 31, 45, 3)
    err = np.abs(frames[:, :31, :45].astype(np.float64) - to_uint8_frames(clip)).mean()
    assert err < MAX_MEAN_ABS_ERROR[fmt]


def _workflow_metadata():
    workflow = {"nodes": [{"id": 1, "type": "LynxSampler", "widgets_values": [42, "unipc", "é✓"]}], "links": []}
    prompt = {"1": {"class_type": "LynxSampler", "inputs": {"seed": 42}}}
    return {"workflow": json.dumps(workflow), "prompt": json.dumps(prompt), "comment": "made with Lynx"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_round_trip(tmp_path, fmt):
    meta = _workflow_metadata()
    path = write_video(_smooth_clip(frames=3), tmp_path / f"m.{fmt}", fps=16, metadata=meta)
    got = probe(path)["metadata"]
    for key, value in meta.items():
        assert got.get(key) == value, key
    assert json.loads(got["workflow"])["nodes"][0]["widgets_values"][2] == "é✓"


def test_mp4_metadata_large_workflow(tmp_path):
    big = json.dumps({"nodes": [{"id": k, "text": "x" * 200} for k in range(300)]})
    path = write_video(_smooth_clip(frames=2), tmp_path / "big.mp4", fps=16, metadata={"workflow": big})
    assert probe(path)["metadata"]["workflow"] == big


def test_accepts_uint8_and_torch_input(tmp_path):
    clip = _smooth_clip(frames=4)
    as_uint8 = to_uint8_frames(clip)
    a = read_video(write_video(as_uint8, tmp_path / "a.webp", fps=16))
    b = read_video(write_video(torch.from_numpy(clip), tmp_path / "b.webp", fps=16))
    assert np.array_equal(a, b)


def test_to_uint8_frames_rounding_and_clamping():
    x = np.array([-0.5, 0.0, 0.5 / 255, 0.5, 1.0, 2.0], dtype=np.float32).reshape(1, 1, 2, 3)
    assert to_uint8_frames(x).ravel().tolist() == [0, 0, 0, 128, 255, 255]


@pytest.mark.parametrize(
    "frames,match",
    [
        (np.zeros((4, 8, 8), np.uint8), "shape"),
        (np.zeros((4, 8, 8, 4), np.uint8), "shape"),
        (np.zeros((4, 8, 8, 3), np.int32), "dtype"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_frames_rejected(tmp_path, frames, match):
    with pytest.raises((ValueError, TypeError), match=match):
        write_video(frames, tmp_path / "x.mp4", fps=16)
    assert not list(tmp_path.iterdir())


def test_format_and_option_errors(tmp_path):
    clip = _smooth_clip(frames=2)
    with pytest.raises(ValueError, match="format"):
        write_video(clip, tmp_path / "x.avi", fps=16)
    with pytest.raises(ValueError, match="agree"):
        write_video(clip, tmp_path / "x.mp4", fps=16, format="gif")
    with pytest.raises(ValueError, match="fps"):
        write_video(clip, tmp_path / "x.mp4", fps=0)
    with pytest.raises(ValueError, match="crf"):
        write_video(clip, tmp_path / "x.mp4", fps=16, crf=99)
    with pytest.raises(ValueError, match="metadata key"):
        write_video(clip, tmp_path / "x.mp4", fps=16, metadata={"bad key": "v"})
    assert not list(tmp_path.iterdir())


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "nope.mp4")


# --------------------------------------------------------------------------------------------
# next_free_path
# --------------------------------------------------------------------------------------------


def test_next_free_path_counts_up_and_never_overwrites(tmp_path):
    first = next_free_path(tmp_path, "lynx", "mp4")
    assert first == tmp_path / "lynx_00001.mp4"
    first.write_bytes(b"1")
    second = next_free_path(tmp_path, "lynx", ".mp4")
    assert second == tmp_path / "lynx_00002.mp4"
    second.write_bytes(b"2")
    # a gap below the highest number is not reused; other extensions share the counter
    first.unlink()
    third = next_free_path(tmp_path, "lynx", "webp")
    assert third == tmp_path / "lynx_00003.webp"
    # unrelated names do not count
    (tmp_path / "lynx_extra_00099.mp4").write_bytes(b"")
    (tmp_path / "other_00050.mp4").write_bytes(b"")
    assert next_free_path(tmp_path, "lynx", "mp4") == tmp_path / "lynx_00003.mp4"
    seen = set()
    for _ in range(5):
        p = next_free_path(tmp_path, "lynx", "mp4")
        assert not p.exists() and p not in seen
        seen.add(p)
        p.write_bytes(b"")


def test_next_free_path_subfolder_prefix(tmp_path):
    p = next_free_path(tmp_path, "videos/lynx", "mp4")
    assert p == tmp_path / "videos" / "lynx_00001.mp4"
    assert (tmp_path / "videos").is_dir() and not p.exists()
    written = write_video(_smooth_clip(frames=2), p, fps=16)
    assert written == p
    assert next_free_path(tmp_path, "videos/lynx", "mp4") == tmp_path / "videos" / "lynx_00002.mp4"


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "", "videos/"])
def test_next_free_path_rejects_bad_prefix(tmp_path, prefix):
    with pytest.raises(ValueError, match="prefix"):
        next_free_path(tmp_path / "out", prefix, "mp4")


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def _tone(seconds: float, rate: int, channels: int = 2, start: float = 0.0) -> np.ndarray:
    """float32 [channels, samples]: silence until ``start`` s, then a 440 Hz tone at 0.5."""
    t = np.arange(int(round(seconds * rate))) / rate
    wave = 0.5 * np.sin(2 * np.pi * 440 * t) * (t >= start)
    return np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)]).astype(np.float32)


def _decode_audio(path):
    """Decoded samples [C, S] float, the decoded rate and the stream's header duration (None for webm)."""
    import av

    with av.open(str(path)) as f:
        assert len(f.streams.video) == 1 and len(f.streams.audio) == 1
        stream = f.streams.audio[0]
        header = float(stream.duration * stream.time_base) if stream.duration else None
        chunks, rate = [], None
        for fr in f.decode(stream):
            chunks.append(fr.to_ndarray().reshape(fr.layout.nb_channels, -1) if fr.format.is_planar
                          else fr.to_ndarray().reshape(-1, fr.layout.nb_channels).T)
            rate = fr.sample_rate
    return np.concatenate(chunks, axis=1), rate, header


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


AUDIO_CASES = [("mp4", 16000, "aac", 16000), ("mp4", 44100, "aac", 44100), ("webm", 16000, "opus", 48000)]


@pytest.mark.parametrize("fmt,rate,codec,out_rate", AUDIO_CASES)
def test_audio_is_muxed_with_the_video_duration_and_rate(tmp_path, fmt, rate, codec, out_rate):
    fps, n = 16.0, 16  # a 1 s clip
    clip = _smooth_clip(frames=n)
    # 0.5 s of tone: the rest of the second must be padded with silence.
    path = write_video(clip, tmp_path / f"sound.{fmt}", fps=fps, audio=(_tone(0.5, rate), rate),
                       metadata={"comment": "x"})
    info = probe(path)
    assert info["audio"] == {"codec": codec, "sample_rate": out_rate, "channels": 2,
                             "duration": info["audio"]["duration"]}
    assert info["frames"] == n and info["metadata"]["comment"] == "x"
    samples, dec_rate, header = _decode_audio(path)
    assert dec_rate == out_rate and samples.shape[0] == 2
    one_frame = out_rate / fps
    assert abs(samples.shape[1] - out_rate * n / fps) <= one_frame
    if header is not None:  # mp4 stores the stream duration
        assert abs(header - n / fps) <= 1 / fps
    # Tone in the first half, silence in the padded second half (a margin for codec smearing).
    first, second = samples[:, : int(0.4 * out_rate)], samples[:, int(0.6 * out_rate):]
    assert _rms(first[0]) > 0.1 and _rms(first[1]) > 1.5 * _rms(first[0])  # channels kept apart
    assert _rms(second) < 0.01
    # The video track is kept as without sound: every frame, in order, as close to the source as a
    # silent encode (x264 with threads is not bit-reproducible, so this is not an exact compare).
    _assert_same_video(read_video(path), clip, fmt)


def _assert_same_video(frames: np.ndarray, clip: np.ndarray, fmt: str) -> None:
    expected = to_uint8_frames(clip).astype(np.float64)
    assert frames.shape == expected.shape
    assert np.abs(frames - expected).mean() < MAX_MEAN_ABS_ERROR[fmt]
    for k in range(len(expected)):
        dists = [np.abs(frames[k].astype(np.float64) - expected[j]).mean() for j in range(len(expected))]
        assert int(np.argmin(dists)) == k


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_long_audio_is_cut_to_the_video(tmp_path, fmt):
    fps, n, rate = 8.0, 8, 16000  # a 1 s clip; the audio is silent for 1 s, then a tone for 2 s
    audio = _tone(3.0, rate, channels=1, start=1.0)
    path = write_video(_smooth_clip(frames=n), tmp_path / f"long.{fmt}", fps=fps, audio=(audio, rate))
    _assert_same_video(read_video(path), _smooth_clip(frames=n), fmt)
    samples, dec_rate, _ = _decode_audio(path)
    assert samples.shape[0] == 1 and probe(path)["audio"]["channels"] == 1
    assert abs(samples.shape[1] - dec_rate * n / fps) <= dec_rate / fps
    assert _rms(samples[:, : int(0.9 * dec_rate)]) < 0.01  # nothing after the first second was kept


@pytest.mark.parametrize("fmt", ["webp", "gif"])
def test_audio_for_animated_images_is_dropped_with_a_warning(tmp_path, fmt, caplog):
    clip = _smooth_clip(frames=4)
    plain = read_video(write_video(clip, tmp_path / f"plain.{fmt}", fps=16))
    with caplog.at_level("WARNING", logger="lynx_core.video"):
        path = write_video(clip, tmp_path / f"sound.{fmt}", fps=16, audio=(_tone(0.25, 16000), 16000))
    assert path.is_file() and probe(path)["audio"] is None
    assert np.array_equal(read_video(path), plain)
    assert any("cannot hold sound" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_audio_input_errors(tmp_path):
    clip = _smooth_clip(frames=2)
    good = _tone(0.1, 16000)
    with pytest.raises(TypeError, match="audio must be a"):
        write_video(clip, tmp_path / "x.mp4", fps=16, audio=good)
    with pytest.raises(ValueError, match="sample rate"):
        write_video(clip, tmp_path / "x.mp4", fps=16, audio=(good, 0))
    with pytest.raises(ValueError, match=r"\[channels, samples\]"):
        write_video(clip, tmp_path / "x.mp4", fps=16, audio=(good[None], 16000))
    with pytest.raises(TypeError, match="float"):
        write_video(clip, tmp_path / "x.mp4", fps=16, audio=((good * 1000).astype(np.int16), 16000))
    with pytest.raises(ValueError, match="NaN"):
        write_video(clip, tmp_path / "x.mp4", fps=16, audio=(np.full((1, 100), np.nan, np.float32), 16000))
    assert not list(tmp_path.iterdir())
