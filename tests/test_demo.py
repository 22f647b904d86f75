"""The README's demo command itself: it must produce a decodable video of the right size and length."""
import re
import subprocess
import sys
from pathlib import Path

from lynx_core.video import probe, read_video

ROOT = Path(__file__).resolve().parents[1]


def run_demo(tmp_path, *args):
    proc = subprocess.run([sys.executable, "-m", "lynx_core", "demo", "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_demo_writes_a_playable_video(tmp_path):
    out = run_demo(tmp_path, "--steps", "3")
    path = Path(re.search(r"wrote (\S+\.mp4)", out).group(1))
    assert path.exists() and path.parent == tmp_path
    frames = read_video(path)
    assert frames.shape == (17, 128, 192, 3)
    info = probe(path)
    assert info["codec"] == "h264" and info["frames"] == 17
    assert "noise, not a person" in out
    assert frames.std() > 1.0  # not a blank video


def test_demo_never_overwrites_and_respects_size_options(tmp_path):
    run_demo(tmp_path, "--steps", "1", "--frames", "5", "--height", "64", "--width", "96", "--format", "webm")
    run_demo(tmp_path, "--steps", "1", "--frames", "5", "--height", "64", "--width", "96", "--format", "webm")
    files = sorted(tmp_path.glob("lynx_demo_*.webm"))
    assert [f.name for f in files] == ["lynx_demo_00001.webm", "lynx_demo_00002.webm"]
    assert read_video(files[1]).shape == (5, 64, 96, 3)


def test_demo_rejects_bad_frame_count(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lynx_core", "demo", "--out", str(tmp_path), "--frames", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "4k+1" in proc.stderr
