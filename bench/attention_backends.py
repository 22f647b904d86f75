"""Attention kernels against each other at the shapes a Wan2.1-14B Lynx pass runs them.

    python bench/attention_backends.py                          # CUDA: 14B shapes, bf16 and fp16
    python bench/attention_backends.py --shapes self --dtypes bf16 --iters 3
    python bench/attention_backends.py --device cpu --tiny      # smoke test (tests/test_gpu_suite.py)

Backends: PyTorch SDPA restricted to one kernel (``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``,
``sdpa_math``), then ``flash_attn`` (FA3 ``flash_attn_interface`` or FA2 ``flash_attn``) and
``sageattention`` when importable. A backend that cannot run a case (not built, unsupported dtype
or device, out of memory) is reported with its reason, never silently dropped.

Shapes (one Lynx block, batch ``--batch`` rows of 480x832x81 = 32,760 video tokens, 40 heads of 128):

* ``self``: video self-attention, 32,760 queries x 32,760 keys;
* ``text``: cross-attention to the 512 UMT5 tokens;
* ``ref``: the Ref-adapter branch, 256 reference tokens (queries without RoPE);
* ``ip``: the ID-adapter branch, 32 tokens (16 ID tokens + 16 registers).

Each case prints ``RESULT {json}``: ``ms`` (median over ``--iters`` after ``--warmup``, CUDA events),
``tflops`` (4·B·H·Lq·Lk·D / time) and ``max_err``: the largest absolute difference from an fp32
reference computed with the plain formula softmax(q·kᵀ/√d)·v on the first ``--check-rows`` query
rows (every query row is independent, so a subset is exact; the full 32,760² score matrix of
the math kernel would not fit). ``sdpa_math`` is timed only where its score matrix fits in
``--math-limit-gb``. The last line is a summary: the fastest backend per case.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    name: str
    q_len: int
    k_len: int
    heads: int
    head_dim: int


def cases(tiny: bool) -> dict[str, Case]:
    if tiny:
        return {"self": Case("self", 256, 256, 2, 64), "text": Case("text", 256, 32, 2, 64),
                "ref": Case("ref", 256, 16, 2, 64), "ip": Case("ip", 256, 8, 2, 64)}
    video = 21 * 30 * 52  # 480x832x81
    return {"self": Case("self", video, video, 40, 128), "text": Case("text", video, 512, 40, 128),
            "ref": Case("ref", video, 256, 40, 128), "ip": Case("ip", video, 32, 40, 128)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small shapes: a smoke test that runs anywhere")
    p.add_argument("--shapes", default="self,text,ref,ip", help="comma-separated: self, text, ref, ip")
    p.add_argument("--dtypes", default=None, help="comma-separated: bf16, fp16, fp32 (default bf16,fp16; CPU: fp32,bf16)")
    p.add_argument("--backends", default=None, help="comma-separated subset (default: every one)")
    p.add_argument("--batch", type=int, default=1, help="rows per call (3 when Lynx batches c, u, i)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--check-rows", type=int, default=1024, help="query rows checked against the fp32 reference")
    p.add_argument("--math-limit-gb", type=float, default=24.0,
                   help="skip timing sdpa_math where its fp32 score matrix would exceed this")
    p.add_argument("--json", type=Path, default=None, help="also write every RESULT to this new file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ backends
# Every backend takes and returns [B, H, L, D] (SDPA's layout); the NHD kernels transpose views.

def _sdpa(kernel_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, kernel_name)

    def run(q, k, v):
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _flash_attn() -> Callable | None:
    try:
        from flash_attn_interface import flash_attn_func  # FA3 (Hopper)
    except ImportError:
        try:
            from flash_attn import flash_attn_func  # FA2
        except ImportError:
            return None

    def run(q, k, v):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    return run


def _sage() -> Callable | None:
    try:
        from sageattention import sageattn
    except ImportError:
        return None

    def run(q, k, v):
        return sageattn(q, k, v, tensor_layout="HND")
    return run


def backends() -> dict[str, Callable | str]:
    """name -> kernel, or the reason it is unavailable."""
    out: dict[str, Callable | str] = {}
    for name, kernel in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                         ("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_math", "MATH")):
        try:
            out[name] = _sdpa(kernel)
        except (ImportError, AttributeError) as err:
            out[name] = f"not in this PyTorch ({err})"
    out["flash_attn"] = _flash_attn() or "not importable (pip install flash-attn)"
    out["sageattention"] = _sage() or "not importable (pip install sageattention)"
    return out


# ------------------------------------------------------------------------------------------------ measuring

def reference(q, k, v, rows: int) -> torch.Tensor:
    """fp32 softmax(q kᵀ / √d) v for the first ``rows`` queries, in query chunks (bounded memory)."""
    d = q.shape[-1]
    outs = []
    kf, vf = k.float(), v.float()
    for start in range(0, rows, 256):
        qf = q[:, :, start:min(rows, start + 256)].float()
        scores = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(d)
        outs.append(torch.matmul(scores.softmax(dim=-1), vf))
    return torch.cat(outs, dim=2)


def timed(fn, args, iters: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``fn(*args)``: CUDA events on a GPU, wall time elsewhere."""
    for _ in range(warmup):
        fn(*args)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(case: Case, dtype_name: str, name: str, kernel, args, device) -> dict:
    dtype = DTYPES[dtype_name]
    row = {"bench": "attention", "case": case.name, "dtype": dtype_name, "backend": name,
           "batch": args.batch, "heads": case.heads, "head_dim": case.head_dim, "q_len": case.q_len,
           "k_len": case.k_len, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if isinstance(kernel, str):
        return {**row, "status": "unavailable", "reason": kernel}
    score_gb = args.batch * case.heads * case.q_len * case.k_len * 4 / 2**30
    if name == "sdpa_math" and score_gb > args.math_limit_gb:
        return {**row, "status": "skipped", "reason": f"score matrix {score_gb:.0f} GiB > --math-limit-gb"}
    g = torch.Generator(device="cpu").manual_seed(0)
    shape_q = (args.batch, case.heads, case.q_len, case.head_dim)
    shape_k = (args.batch, case.heads, case.k_len, case.head_dim)
    q = torch.randn(shape_q, generator=g).to(device, dtype)
    k = torch.randn(shape_k, generator=g).to(device, dtype)
    v = torch.randn(shape_k, generator=g).to(device, dtype)
    try:
        with torch.no_grad():
            out = kernel(q, k, v)
            rows = min(args.check_rows, case.q_len)
            err = (out[:, :, :rows].float() - reference(q, k, v, rows)).abs().max().item()
            ms = timed(kernel, (q, k, v), args.iters, args.warmup, device)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:  # no kernel for this case
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {**row, "status": "failed", "reason": first[:300]}
    flops = 4 * args.batch * case.heads * case.q_len * case.k_len * case.head_dim
    return {**row, "status": "ok", "ms": round(ms, 4), "tflops": round(flops / (ms * 1e-3) / 1e12, 2),
            "max_err": float(f"{err:.3g}")}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.json is not None and args.json.exists():
        print(f"attention_backends: {args.json} exists; not overwriting it", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("attention_backends: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtypes = args.dtypes or ("bf16,fp16" if device.type == "cuda" else "fp32,bf16")
    all_cases = cases(args.tiny)
    try:
        chosen = [all_cases[s.strip()] for s in args.shapes.split(",") if s.strip()]
        dts = [d.strip() for d in dtypes.split(",") if d.strip()]
        for d in dts:
            DTYPES[d]
    except KeyError as err:
        print(f"attention_backends: unknown --shapes/--dtypes entry {err}; shapes: {', '.join(all_cases)}; "
              f"dtypes: {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    kernels = backends()
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in kernels]
        if unknown:
            print(f"attention_backends: unknown --backends {unknown}; choose from {', '.join(kernels)}", file=sys.stderr)
            return 2
        kernels = {b: kernels[b] for b in wanted}
    rows = []
    for case in chosen:
        for dtype in dts:
            for name, kernel in kernels.items():
                row = run_case(case, dtype, name, kernel, args, device)
                rows.append(row)
                print("RESULT " + json.dumps(row), flush=True)
    fastest = {}
    for row in rows:
        if row["status"] == "ok":
            key = f"{row['case']}_{row['dtype']}"
            if key not in fastest or row["ms"] < fastest[key]["ms"]:
                fastest[key] = {"backend": row["backend"], "ms": row["ms"], "max_err": row["max_err"]}
    summary = {"bench": "attention_summary", "device": rows[0]["device"] if rows else args.device,
               "fastest": fastest, "ok": sum(r["status"] == "ok" for r in rows), "cases": len(rows)}
    print("RESULT " + json.dumps(summary), flush=True)
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".part")
        tmp.write_text("\n".join(json.dumps(r) for r in (*rows, summary)) + "\n")
        tmp.rename(args.json)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
