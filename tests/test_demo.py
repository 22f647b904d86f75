"""The README's demo command itself: it must produce a decodable video of the right size and length."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from lynx_core.video import probe, read_video

ROOT = Path(__file__).resolve().parents[1]


# scikit-image is a test-only dependency: the demo must run without it (it uses the shipped photo).
WITHOUT_SKIMAGE = ("import sys; sys.modules['skimage'] = None; from lynx_core import demo; "
                   "demo.run(demo.build_parser().parse_args(sys.argv[2:]))")


def run_demo(tmp_path, *args, python_args=("-m", "lynx_core")):
    proc = subprocess.run([sys.executable, *python_args, "demo", "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_demo_writes_a_playable_video(tmp_path):
    out = run_demo(tmp_path, "--steps", "3", python_args=("-c", WITHOUT_SKIMAGE))
    path = Path(re.search(r"wrote (\S+\.mp4)", out).group(1))
    assert path.exists() and path.parent == tmp_path
    frames = read_video(path)
    assert frames.shape == (17, 128, 192, 3)
    info = probe(path)
    assert info["codec"] == "h264" and info["frames"] == 17
    assert "noise, not a person" in out
    assert frames.std() > 1.0  # not a blank video
    assert "Identity from 1 face(s) in 1 image(s)." in out  # the shipped photo was found and used


def test_the_example_photo_is_a_small_png_with_one_detectable_face():
    from PIL import Image

    from lynx_core.assets import EXAMPLE_FACE
    from lynx_core.face import FaceAnalyzer

    assert EXAMPLE_FACE.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and EXAMPLE_FACE.stat().st_size < 400_000
    image = Image.open(EXAMPLE_FACE)
    assert image.mode == "RGB" and 256 <= min(image.size) <= max(image.size) <= 384
    faces = FaceAnalyzer(detector="mtcnn", arcface_path=None).detect(np.asarray(image))
    assert len(faces) == 1


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


def test_runtime_needs_no_scikit_image():
    """ComfyUI users install requirements.txt only: neither it nor the package's runtime dependencies
    name scikit-image, and the nodes and the engine import without it."""
    reqs = (ROOT / "requirements.txt").read_text().lower()
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = pyproject[pyproject.index("\ndependencies = ["):].split("]", 1)[0]  # tomllib is 3.11+
    assert "numpy" in deps and "scikit-image" not in deps and "scikit-image" not in reqs
    code = ("import sys; sys.modules['skimage'] = None; import nodes, lynx_core.face, lynx_core.demo, "
            "lynx_core.pipeline; from nodes import NODE_CLASS_MAPPINGS; assert NODE_CLASS_MAPPINGS")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
