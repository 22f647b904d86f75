"""Smoke run of bench/lynx_overhead.py at its smallest settings: RESULT lines parse, ratios are there.

Timings are the benchmark's business; nothing here asserts a speed. With COMFYUI_PATH set (as for
the e2e tests) the ComfyUI figures run too; without it the script must say it skipped them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lynx_overhead_bench_prints_ratio_results(tmp_path):
    comfy = os.environ.get("COMFYUI_PATH")
    env = dict(os.environ, LYNX_COMPILE="0")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "lynx_overhead.py"), "--device", "cpu", "--shape", "tiny",
         "--rounds", "1", "--dtypes", "fp32,bf16", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results == json.loads(out.read_text())
    summary = results[-1]
    assert summary["part"] == "summary" and summary["figure"] == "lynx_overhead"
    figures = results[:-1]
    assert all("error" not in r for r in figures), [r.get("error") for r in figures]
    parts = {(r["part"], r["dtype"]) for r in figures}
    want = {"core"} | ({"model", "block"} if comfy else set())
    assert parts == {(p, d) for p in want for d in ("fp32", "bf16")}
    if not comfy:
        assert "ComfyUI not found" in proc.stdout
    for r in figures:
        ratios = {k: v for k, v in r.items() if k.endswith("_ratio")}
        assert ratios and all(isinstance(v, float) and v > 0 for v in ratios.values())
        for key in ratios:
            assert f"{key[:-len('_ratio')]}_{r['dtype']}_ratio" in summary
