"""docs/engine.md: its complete example runs as written, and its snippets name real API."""
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "engine.md"
MARKER = "<!-- example: run by tests/test_engine_doc.py -->"


def _blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _example(text):
    assert MARKER in text, "the example block is marked for this test"
    (block,) = _blocks(text.split(MARKER, 1)[1])[:1]
    return block


def test_the_example_runs_as_written(tmp_path):
    script = tmp_path / "engine_example.py"
    script.write_text(_example(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Identity from 1 face(s) in 1 image(s)." in proc.stdout  # the shipped photo's face was used
    assert "cfg_id=2.0" in proc.stdout                             # full adapters: three-pass default
    path = Path(re.search(r"wrote (\S+\.mp4) \(5, 64, 96, 3\)", proc.stdout).group(1))
    assert path.is_file() and path.is_relative_to(tmp_path)
    from lynx_core.video import read_video
    assert read_video(path).shape == (5, 64, 96, 3)


def test_every_lynx_core_name_in_the_doc_exists():
    """Each `from lynx_core... import x` in any snippet imports, so the page cannot drift from the API."""
    names = []
    for block in _blocks(DOC.read_text(encoding="utf-8")):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lynx_core"):
                names += [(node.module, a.name) for a in node.names]
    assert len(names) > 20
    missing = [f"{m}.{n}" for m, n in names if not hasattr(importlib.import_module(m), n)]
    assert missing == []


def test_the_doc_covers_each_step_and_points_to_training():
    text = DOC.read_text(encoding="utf-8")
    for heading in ("Load Wan and the adapters", "The face", "The reference pass", "Conditioning and the patch",
                    "Generate", "Offload", "Training"):
        assert re.search(rf"^## (\d+\. )?{re.escape(heading)}", text, re.M), heading
    assert "(training.md)" in text
    # the documented GenerationSettings defaults are the real ones
    from lynx_core.pipeline import GenerationSettings
    for field, value in vars(GenerationSettings()).items():
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        assert f"`{field}={shown}`" in text, f"GenerationSettings.{field} default is not documented as {shown}"
