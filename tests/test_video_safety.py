"""LynxVideoCombine and the video writer under concurrency, failures and bad input (issue 9)."""
from __future__ import annotations

import builtins
import errno
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lynx_core.video as video
import nodes.comfy_env as comfy_env
from lynx_core.video import (
    next_free_path,
    probe,
    read_video,
    reserve_numbered_path,
    save_numbered_video,
    to_uint8_frames,
    write_video,
)
from nodes.images import to_uint8
from nodes.video import LynxVideoCombine


@pytest.fixture()
def out_dir(monkeypatch, tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(comfy_env, "output_directory", lambda: out)
    return out


def _writer_frames(k: int, n: int = 6, size: int = 16) -> torch.Tensor:
    """Writer k's clip: red = its own level, green steps with the frame index."""
    f = torch.zeros(n, size, size, 3)
    f[..., 0] = 0.1 + 0.15 * k
    f[..., 1] = torch.arange(n).float().div(n - 1)[:, None, None]
    f[..., 2] = 0.5
    return f


def _combine(frames, prefix="Lynx/race", fmt="webp"):
    return LynxVideoCombine().combine(frames, 16.0, fmt, prefix, 19, False)


def _all_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# 1. simultaneous writers, failed writes
# --------------------------------------------------------------------------------------------


def test_six_simultaneous_writers_leave_six_distinct_complete_files(out_dir, monkeypatch):
    real = video._write_pil

    def slow_write(*args, **kwargs):
        real(*args, **kwargs)
        time.sleep(0.3)  # every writer is mid-write at once, as with two busy ComfyUI instances

    monkeypatch.setattr(video, "_write_pil", slow_write)
    n = 6
    barrier = threading.Barrier(n)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            barrier.wait()
            results[k] = _combine(_writer_frames(k))["result"][0]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(set(results.values())) == n
    assert _all_files(out_dir) == [f"Lynx/race_{i:05d}.webp" for i in range(1, n + 1)]  # no temp files left
    for k, name in results.items():
        frames = read_video(name)
        assert frames.shape == (6, 16, 16, 3)
        # each file holds its own writer's clip, whole
        assert np.abs(frames.astype(float) - to_uint8(_writer_frames(k)).astype(float)).mean() < 4.0


def test_reserved_names_are_taken_at_once(tmp_path):
    first = reserve_numbered_path(tmp_path, "clips/lynx", "mp4")
    assert first == tmp_path / "clips" / "lynx_00001.mp4" and first.is_file() and first.stat().st_size == 0
    (tmp_path / "clips" / "lynx_00002.mp4").mkdir()  # whatever holds a name is skipped
    assert reserve_numbered_path(tmp_path, "clips/lynx", "webp") == tmp_path / "clips" / "lynx_00003.webp"
    assert next_free_path(tmp_path, "clips/lynx", "mp4") == tmp_path / "clips" / "lynx_00004.mp4"


def test_a_crash_mid_write_leaves_no_file_under_the_final_name(out_dir, monkeypatch):
    real = video._write_pil

    def dying_write(arr, path, *args):
        Path(path).write_bytes(b"RIFF\0\0half a file")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video, "_write_pil", dying_write)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        _combine(_writer_frames(0))
    assert _all_files(out_dir) == []  # neither the half file, nor its temporary, nor an empty placeholder
    monkeypatch.setattr(video, "_write_pil", real)
    res = _combine(_writer_frames(0))
    assert res["ui"]["videos"][0]["filename"] == "race_00001.webp"  # the failed run's number was released


@pytest.mark.parametrize("code,match", [(errno.EIO, "I/O error"), (errno.ENOSPC, "no space left .* free some space")])
def test_a_failed_write_keeps_the_existing_file_intact(tmp_path, monkeypatch, code, match):
    target = tmp_path / "keep.gif"
    target.write_bytes(b"the old file")

    def dying_write(arr, path, *args):
        Path(path).write_bytes(b"GIF89a half")
        raise OSError(code, os.strerror(code) if code != errno.EIO else "I/O error")

    monkeypatch.setattr(video, "_write_pil", dying_write)
    with pytest.raises(OSError, match=match):
        write_video(to_uint8_frames(np.zeros((2, 8, 8, 3), np.float32)), target, fps=8)
    assert target.read_bytes() == b"the old file"
    assert _all_files(tmp_path) == ["keep.gif"]


def test_a_long_name_that_fits_is_written(tmp_path):
    # the temporary name is longer than the final one; it must still fit the 255-byte limit
    prefix = "x" * 240
    path = save_numbered_video(np.full((2, 8, 8, 3), 0.5, np.float32), tmp_path, prefix, fps=8, format="gif")
    assert path.name == prefix + "_00001.gif" and probe(path)["width"] == 8
    assert _all_files(tmp_path) == [path.name]


# --------------------------------------------------------------------------------------------
# 2. NaN / inf frames
# --------------------------------------------------------------------------------------------


def test_nan_frames_are_refused_by_the_node_naming_the_frames(out_dir):
    frames = _writer_frames(1)
    frames[2, 3, 4, 0] = float("nan")
    frames[4] = float("nan")
    frames[5, 0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"images: frame\(s\) 2, 4-5 of 6") as info:
        _combine(frames, fmt="mp4")
    assert "bf16" in str(info.value) and "fp32" in str(info.value)
    assert _all_files(out_dir) == []


def test_nan_only_in_an_ignored_alpha_channel_is_fine():
    frames = torch.full((2, 4, 4, 4), 0.5)
    frames[..., 3] = float("nan")
    assert to_uint8(frames, "images").shape == (2, 4, 4, 3)


def test_the_engine_writer_names_the_bad_frames(tmp_path):
    clip = np.full((12, 8, 8, 3), 0.5, np.float32)
    clip[[1, 3, 4, 5, 11], 0, 0, 2] = -np.inf
    with pytest.raises(ValueError, match=r"frames: frame\(s\) 1, 3-5, 11 of 12 .*NaN or infinite"):
        write_video(clip, tmp_path / "x.webm", fps=16)
    assert _all_files(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 3. webp of identical frames
# --------------------------------------------------------------------------------------------


def _pil_frames(path: Path) -> tuple[int, list[int], int]:
    from PIL import Image

    with Image.open(path) as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            durations.append(im.info["duration"])
        return im.n_frames, durations, im.info.get("loop")


def test_webp_of_identical_frames_keeps_every_frame_and_the_duration(tmp_path):
    still = np.zeros((8, 20, 24, 3), np.float32)
    still[..., 0] = np.linspace(0, 1, 24)
    path = write_video(still, tmp_path / "still.webp", fps=16, loop=3, metadata={"prompt": "{}", "workflow": "w"})
    n, durations, loop = _pil_frames(path)
    assert n == 8 and durations == [62] * 8 and loop == 3
    info = probe(path)
    assert info["frames"] == 8 and info["fps"] == pytest.approx(16, rel=0.05)
    assert info["metadata"] == {"prompt": "{}", "workflow": "w"}
    frames = read_video(path)
    assert frames.shape == (8, 20, 24, 3)
    assert np.abs(frames.astype(float) - to_uint8_frames(still).astype(float)).mean() < 3.0


def test_webp_with_runs_of_identical_frames_keeps_each_frame_in_place(tmp_path):
    clip = _writer_frames(2, n=4).numpy()
    runs = np.concatenate([clip[[0]]] * 3 + [clip[[1]]] * 2 + [clip[[2, 3]]])  # a a a b b c d
    path = write_video(runs, tmp_path / "runs.webp", fps=10)
    n, durations, _ = _pil_frames(path)
    assert n == 7 and sum(durations) == 700
    frames = read_video(path).astype(float)
    expected = to_uint8_frames(runs).astype(float)
    for k in range(7):
        assert np.abs(frames[k] - expected[k]).mean() < 3.0, k


def test_webp_without_repeated_frames_is_exactly_what_pillow_writes(tmp_path):
    from PIL import Image

    clip = to_uint8_frames(_writer_frames(3).numpy())
    path = write_video(clip, tmp_path / "moving.webp", fps=16)
    ims = [Image.fromarray(a, "RGB") for a in clip]
    buf = io.BytesIO()
    ims[0].save(buf, format="WEBP", save_all=True, append_images=ims[1:], loop=0, duration=62, quality=90, method=4)
    assert path.read_bytes() == buf.getvalue()


# --------------------------------------------------------------------------------------------
# 4. bad prefixes and unwritable folders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix,match",
    [
        ("Lynx/ly\x00nx", r"filename_prefix .*NUL character"),
        ("a" * 300, r"filename_prefix .*255 bytes"),
        ("b" * 300 + "/lynx", r"filename_prefix .*255 bytes"),
        ("/tmp/lynx", r"filename_prefix .*absolute path"),
        ("C:/lynx", r"filename_prefix .*absolute path"),
        ("Lynx/../../lynx", r"filename_prefix .*outside the output folder"),
    ],
)
def test_bad_prefixes_name_filename_prefix_and_the_fix(out_dir, prefix, match):
    with pytest.raises(ValueError, match=match):
        _combine(_writer_frames(0), prefix=prefix)
    assert _all_files(out_dir) == []


def test_a_prefix_folder_that_is_a_file(out_dir):
    (out_dir / "clips").write_text("notes")
    with pytest.raises(ValueError, match=r"filename_prefix 'clips/lynx': 'clips' .* is an existing file"):
        _combine(_writer_frames(0), prefix="clips/lynx")
    assert (out_dir / "clips").read_text() == "notes"


def test_a_read_only_output_folder(out_dir, monkeypatch):
    # Tests may run as root, where chmod does not stop writes: the refusal is simulated the way the
    # kernel reports it (EACCES from any open for writing, or mkdir) for paths inside the output folder.
    real_open, real_builtin_open, real_mkdir = os.open, builtins.open, Path.mkdir

    def deny_open(path, *args, **kwargs):
        if str(path).startswith(str(out_dir)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def deny_builtin_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and str(file).startswith(str(out_dir)) and set(mode) & set("wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_builtin_open(file, mode, *args, **kwargs)

    def deny_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(out_dir)) and not self.is_dir():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny_open)
    monkeypatch.setattr(builtins, "open", deny_builtin_open)
    monkeypatch.setattr(Path, "mkdir", deny_mkdir)
    for prefix in ("lynx", "NewFolder/lynx"):
        with pytest.raises(PermissionError, match=r"output folder .* is not writable .*--output-directory"):
            _combine(_writer_frames(0), prefix=prefix)
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(builtins, "open", real_builtin_open)
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert _all_files(out_dir) == []


# --------------------------------------------------------------------------------------------
# 5. symlinked sub-folders
# --------------------------------------------------------------------------------------------


def test_a_symlinked_sub_folder_of_the_output_folder_is_accepted(out_dir, tmp_path):
    elsewhere = tmp_path / "big_disk" / "videos"
    elsewhere.mkdir(parents=True)
    (out_dir / "linked").symlink_to(elsewhere, target_is_directory=True)
    res = _combine(_writer_frames(0), prefix="linked/lynx")
    entry = res["ui"]["videos"][0]
    assert entry["subfolder"] == "linked" and entry["filename"] == "lynx_00001.webp"
    assert res["result"] == (str(out_dir / "linked" / "lynx_00001.webp"),)
    assert (elsewhere / "lynx_00001.webp").is_file()
    assert next_free_path(out_dir, "linked/lynx", "mp4") == out_dir / "linked" / "lynx_00002.mp4"
    # `..` still may not climb out, through the link or not
    for prefix in ("linked/../../lynx", "../big_disk/videos/lynx"):
        with pytest.raises(ValueError, match="outside the output folder"):
            _combine(_writer_frames(0), prefix=prefix)


def test_dot_dot_inside_the_output_folder_is_fine(out_dir):
    res = _combine(_writer_frames(0), prefix="a/../Lynx/./lynx")
    assert res["ui"]["videos"][0]["subfolder"] == "Lynx" and (out_dir / "Lynx" / "lynx_00001.webp").is_file()
