"""bench/gpu_suite.sh and bench/attention_backends.py on a machine without a GPU: the suite says so
and exits 0, its part loop (timeouts, RESULT lines, summary) works, the CUDA-only tests are found,
and the attention benchmark's smoke run reports every backend with a correct error figure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.sh"
sys.path.insert(0, str(REPO / "bench"))
from cuda_tests import cuda_test_ids  # noqa: E402


def _env(**extra):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    env.pop("LYNX_SUITE_FAKE_GPU", None)
    env.update(extra)
    return env


def _results(stdout: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in stdout.splitlines() if line.startswith("RESULT ")]


def test_without_a_gpu_the_suite_says_so_and_exits_0():
    proc = subprocess.run(["bash", str(SUITE)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU found" in proc.stdout
    assert "RESULT" not in proc.stdout


def test_dry_run_lists_every_part_with_its_command():
    proc = subprocess.run(["bash", str(SUITE), "--dry-run"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    parts = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("PART ")}
    assert list(parts) == ["tests", "overhead", "overhead_compiled", "blockswap", "attention", "train"]
    for test_id in cuda_test_ids():
        assert test_id in parts["tests"]
    assert "lynx_overhead.py --shape 14b --device cuda" in parts["overhead"]
    assert "--compile-model" in parts["overhead_compiled"] and "--compile-model" not in parts["overhead"]
    assert "blockswap.py" in parts["blockswap"] and "--vram-cap-gb 24" in parts["blockswap"]
    assert "attention_backends.py" in parts["attention"] and "train_step.py" in parts["train"]
    bad = subprocess.run(["bash", str(SUITE), "--parts", "tests,nope"], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'nope'" in bad.stderr


def test_part_loop_times_out_reports_failures_and_sums_up(tmp_path):
    env = _env(LYNX_SUITE_FAKE_GPU="no gpu (test)", LYNX_SUITE_LOGS=str(tmp_path), LYNX_SUITE_T_TESTS="1")
    proc = subprocess.run(["bash", str(SUITE), "--parts", "tests,attention"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = _results(proc.stdout)
    summary = results[-1]
    assert summary["suite"] == "gpu_suite" and summary["gpu"] == "no gpu (test)"
    assert summary["parts"]["tests"]["status"] == "timeout"          # 1 s cannot even start pytest
    assert summary["parts"]["attention"]["status"] == "failed_rc_2"  # --device cuda without CUDA
    assert results[0]["suite"] == "cuda_tests" and "error" in results[0]  # no junit report after the timeout
    assert (tmp_path / "attention.log").read_text().strip().endswith("no CUDA device is available")
    assert "SUMMARY tests" in proc.stdout and "SUMMARY attention" in proc.stdout


def test_cuda_only_tests_are_found_and_cpu_tests_are_not():
    ids = cuda_test_ids()
    assert "tests/test_rope_cache.py::test_cuda_table_is_cached_on_the_device_and_equals_the_host_one" in ids
    assert "tests/test_offload.py::test_cuda_stream_ring_matches_resident" in ids
    assert not any("test_pipeline_batched" in i or "test_gpu_suite" in i for i in ids)
    for test_id in ids:
        path, name = test_id.split("::", 1)
        assert f"def {name.split('::')[-1]}(" in (REPO / path).read_text()


def test_attention_benchmark_smoke_run_on_the_cpu(tmp_path, capsys):
    import attention_backends

    out = tmp_path / "attention.json"
    argv = ["--device", "cpu", "--tiny", "--shapes", "self,ip", "--dtypes", "fp32,bf16", "--iters", "1",
            "--warmup", "0", "--json", str(out)]
    assert attention_backends.main(argv) == 0
    rows = _results(capsys.readouterr().out)
    cases = [r for r in rows if r["bench"] == "attention"]
    backends = {"sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flash_attn", "sageattention"}
    assert {(r["case"], r["dtype"], r["backend"]) for r in cases} == {
        (c, d, b) for c in ("self", "ip") for d in ("fp32", "bf16") for b in backends}
    for r in cases:
        assert r["status"] in ("ok", "unavailable", "failed", "skipped")
        assert r["status"] == "ok" or r["reason"]
    math32 = [r for r in cases if r["backend"] == "sdpa_math" and r["dtype"] == "fp32"]
    assert all(r["status"] == "ok" and r["max_err"] < 1e-5 and r["ms"] > 0 for r in math32)
    bf16 = [r for r in cases if r["status"] == "ok" and r["dtype"] == "bf16"]
    assert bf16 and all(1e-5 < r["max_err"] < 5e-2 for r in bf16)  # bf16 rounding shows, nothing worse
    summary = rows[-1]
    assert summary["bench"] == "attention_summary" and summary["fastest"]["self_fp32"]["backend"] in backends
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert attention_backends.main(argv) == 2 and "not overwriting" in capsys.readouterr().err


def test_attention_benchmark_as_a_script_on_the_cpu():
    cmd = [sys.executable, str(REPO / "bench" / "attention_backends.py"), "--device", "cpu", "--tiny", "--shapes",
           "ip", "--dtypes", "fp32", "--backends", "sdpa_math,flash_attn", "--iters", "1", "--warmup", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = _results(proc.stdout)
    assert [(r.get("backend"), r.get("status")) for r in rows[:-1]] == [("sdpa_math", "ok"), ("flash_attn", "unavailable")]
