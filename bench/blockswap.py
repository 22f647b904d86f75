"""Block-swap benchmark: 14B-shaped Wan blocks at 480x832x81, resident vs swapped vs a synchronous swap.

    python bench/blockswap.py                         # 40 blocks, 24 GiB cap, auto plan, bf16
    python bench/blockswap.py --blocks 20 --steps 1   # less RAM and time
    python bench/blockswap.py --fp8-host              # fp8 host copies, upcast on the GPU
    python bench/blockswap.py --device cpu --tiny     # smoke test (the test suite runs this)

One "step" is ``--passes`` forwards (Lynx runs three: uncond, id-only, cond) through every block,
with per-block Lynx adapter keys/values as the real run uses them. Weights are random (timing does
not depend on them). The modes run in one process on the same blocks:

1. resident: every block on the GPU, no cap (the reference time);
2. sync: the plan's swapped blocks moved with a blocking ``block.to(gpu)`` before and
   ``block.to(cpu)`` after each use, from pageable memory (what common block-swap nodes do);
3. swapped: :class:`lynx_core.offload.BlockSwapper` with the same plan.

Modes 2 and 3 run under ``--vram-cap-gb`` (PyTorch's per-process memory fraction), so an over-full
plan fails as it would on a 24 GB card. The script prints step times, the ratios to resident, peak
device memory, host RAM and the swapper's per-block copy/compute/stall times, then one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lynx_core.attention import get_attention  # noqa: E402
from lynx_core.block import BlockAdapterInputs, wan_block_forward  # noqa: E402
from lynx_core.offload import BlockSwapper, plan_block_swap  # noqa: E402
from lynx_core.offload.host import fmt_bytes, process_rss_bytes  # noqa: E402
from lynx_core.wan.config import WAN_CONFIGS  # noqa: E402
from lynx_core.wan.model import WanBlock  # noqa: E402
from lynx_core.wan.rope import apply_rope, rope_freqs  # noqa: E402

GiB = 1 << 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny widths and tokens: a smoke test that runs anywhere")
    p.add_argument("--blocks", type=int, default=None, help="number of blocks (default 40, tiny 4)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--passes", type=int, default=3, help="forwards per step (Lynx: 3)")
    p.add_argument("--vram-cap-gb", type=float, default=24.0,
                   help="usable device memory for the swapped modes, in GiB (0: no cap)")
    p.add_argument("--context-gb", type=float, default=0.75,
                   help="part of the cap a real card loses to the CUDA context and the desktop (GiB)")
    p.add_argument("--blocks-to-swap", default=None, help="a count or 'auto' (default: auto; tiny: half)")
    p.add_argument("--reserve-gb", type=float, default=None, help="plan reserve in GiB (default: the library's)")
    p.add_argument("--ring-size", type=int, default=2)
    p.add_argument("--placement", choices=["spread", "tail"], default="spread")
    p.add_argument("--fp8-host", action="store_true", help="store swapped weights as fp8 on the host")
    p.add_argument("--no-pin", action="store_true", help="pageable host masters")
    p.add_argument("--pin-limit-gb", type=float, default=None)
    p.add_argument("--no-lynx", action="store_true", help="plain Wan blocks, no adapter branches")
    p.add_argument("--skip-resident", action="store_true")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# model pieces
# ------------------------------------------------------------------------------------------------

def build_blocks(cfg, n: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.ModuleList:
    """``n`` blocks with random weights, on the host, built without a float32 detour (a 14B block
    is 1.4 GB in float32)."""
    if cfg.dim <= 256:  # tiny: small enough to build directly
        blocks = torch.nn.ModuleList([WanBlock(cfg) for _ in range(n)]).to(dtype)
    else:
        with torch.device("meta"):
            blocks = torch.nn.ModuleList([WanBlock(cfg) for _ in range(n)])
        blocks = blocks.to(dtype=dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    largest = max(p.numel() for p in blocks.parameters())
    pool = (torch.randn(min(1 << 22, largest), generator=g) * 0.02).to(dtype)  # copied in slices: fast, still varied
    with torch.no_grad():
        for name, p in blocks.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or ".norm3." in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            flat = p.view(-1)
            off = int(torch.randint(0, pool.numel(), (1,), generator=g))
            filled = 0
            while filled < flat.numel():
                take = min(flat.numel() - filled, pool.numel() - off)
                flat[filled:filled + take].copy_(pool[off:off + take])
                filled += take
                off = 0
    return blocks


def make_inputs(cfg, grid, dtype, device, lynx: bool, n_blocks: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = math.prod(grid)
    x = (torch.randn(1, tokens, cfg.dim, generator=g)).to(device=device, dtype=dtype)
    e = (torch.randn(1, 6, cfg.dim, generator=g) * 0.1).to(device)
    ctx = (torch.randn(1, 512 if cfg.dim > 256 else 16, cfg.dim, generator=g)).to(device=device, dtype=dtype)
    freqs = rope_freqs(grid, cfg.head_dim, device=device)
    adapters = [None] * n_blocks
    if lynx:
        ref_len = 256 if cfg.dim > 256 else 8
        for i in range(n_blocks):
            kv = [(torch.randn(1, L, cfg.dim, generator=g) * 0.5).to(device=device, dtype=dtype)
                  for L in (32, 32, ref_len, ref_len)]
            adapters[i] = BlockAdapterInputs(ip=(kv[0], kv[1]), ref=(kv[2], kv[3]))
    return x, e, ctx, freqs, adapters


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(blocks, inputs, attention, block_call, steps: int, passes: int, device) -> tuple[float, torch.Tensor]:
    """One warm-up step, then ``steps`` timed ones; returns (seconds per step, first forward output)."""
    x, e, ctx, freqs, adapters = inputs
    first = None

    def forward():
        h = x
        for i, block in enumerate(blocks):
            h = block_call(i, block, h, e, freqs, ctx, adapters[i], attention)
        return h

    with torch.no_grad():
        for _ in range(passes):  # warm-up step
            out = forward()
            if first is None:
                first = out.float().cpu()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            for _ in range(passes):
                forward()
        sync(device)
    return (time.perf_counter() - t0) / max(steps, 1), first


def lynx_block(i, block, x, e, freqs, ctx, adapters, attention):
    return wan_block_forward(block, x, e, freqs, ctx, rope=apply_rope, attention=attention, adapters=adapters)


def peak_stats(device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated": None, "peak_reserved": None}
    return {"peak_allocated": torch.cuda.max_memory_allocated(device),
            "peak_reserved": torch.cuda.max_memory_reserved(device)}


def reset_peak(device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def to_device_keep_host(blocks, indices, device, saved: list) -> None:
    """Move blocks to the device, remembering their host tensors in ``saved`` so that going back
    costs no copy (and works after an out-of-memory error halfway)."""
    for b in indices:
        for t in list(blocks[b].parameters()) + list(blocks[b].buffers()):
            host = t.data
            t.data = host.to(device)
            saved.append((t, host))


def restore_host(saved) -> None:
    for t, data in saved:
        t.data = data


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls only lose to thread synchronisation
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    if args.tiny:
        cfg = WAN_CONFIGS["tiny"]
        n_blocks = args.blocks or 4
        grid = (2, 4, 4)
        default_swap = str(n_blocks // 2)
    else:
        cfg = WAN_CONFIGS["14B"]
        n_blocks = args.blocks or cfg.num_layers
        grid = ((args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
        default_swap = "auto" if device.type == "cuda" else str(n_blocks // 2)
    swap_arg = args.blocks_to_swap or default_swap
    tokens = math.prod(grid)
    attention = get_attention("auto")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results: dict = {"device": str(device), "gpu": gpu,
                     "blocks": n_blocks, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "tokens": tokens, "grid": grid,
                     "dtype": args.dtype, "passes": args.passes, "steps": args.steps, "fp8_host": args.fp8_host,
                     "lynx": not args.no_lynx}
    print(f"== block swap bench: {n_blocks} blocks of dim {cfg.dim}, ffn {cfg.ffn_dim}, {tokens} tokens "
          f"(grid {grid}), {args.dtype}, {args.passes} passes/step, on {results['gpu'] or device}")

    t = time.perf_counter()
    blocks = build_blocks(cfg, n_blocks, dtype)
    inputs = make_inputs(cfg, grid, dtype, device, not args.no_lynx, n_blocks)
    print(f"built blocks in {time.perf_counter() - t:.1f} s; host RSS {fmt_bytes(process_rss_bytes())}")
    block_call = lynx_block

    # 1. resident ---------------------------------------------------------------------------------
    resident_out = None
    if not args.skip_resident:
        reset_peak(device)
        saved: list = []
        try:
            to_device_keep_host(blocks, range(n_blocks), device, saved)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            step, resident_out = run_steps(blocks, inputs, attention, block_call, args.steps, args.passes, device)
            results["resident"] = {"step_s": step, **peak_stats(device)}
            if base is not None:  # what the blocks' temporaries really took, for the plan's estimate
                results["resident"]["activation_measured"] = results["resident"]["peak_allocated"] - base
            print(f"resident : {step:8.3f} s/step   peak {fmt_bytes(results['resident']['peak_allocated'])}")
        except torch.OutOfMemoryError:
            results["resident"] = {"error": "out of memory: the blocks do not fit resident; use fewer --blocks"}
            print("resident : out of memory (use fewer --blocks to get a reference time)")
        finally:
            restore_host(saved)
    gc.collect()

    # cap -----------------------------------------------------------------------------------------
    cap = None
    if device.type == "cuda" and args.vram_cap_gb > 0:
        total = torch.cuda.get_device_properties(device).total_memory
        cap = int((args.vram_cap_gb - args.context_gb) * GiB)
        if cap < total:
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(cap / total, device)
            print(f"cap: {args.vram_cap_gb:g} GiB card = {fmt_bytes(cap)} for PyTorch "
                  f"(minus {args.context_gb:g} GiB context/desktop)")
        else:
            cap = None
    results["cap_bytes"] = cap

    plan_kw = dict(tokens=tokens, passes=args.passes, vram_cap_bytes=cap, ring_size=args.ring_size,
                   placement=args.placement, host_dtype=torch.float8_e4m3fn if args.fp8_host else None,
                   pin=not args.no_pin,
                   pin_limit_bytes=int(args.pin_limit_gb * GiB) if args.pin_limit_gb is not None else "auto")
    if args.reserve_gb is not None:
        plan_kw["reserve_bytes"] = int(args.reserve_gb * GiB)
    plan = plan_block_swap(blocks, swap_arg, device, **plan_kw)
    print(plan.describe())
    results["plan"] = {"resident": plan.resident, "swapped": plan.swapped,
                       "activation_estimate": plan.activation_bytes, "ring_bytes": plan.ring_bytes,
                       "free_bytes": plan.free_bytes, "pinned_estimate": plan.pinned_bytes}
    swapped = set(plan.swapped)

    # 2. synchronous .to() swap -------------------------------------------------------------------
    if not args.skip_sync and swapped:
        reset_peak(device)
        saved = []

        def sync_call(i, block, x, e, freqs, ctx, adapters, attn):
            if i not in swapped:
                return block_call(i, block, x, e, freqs, ctx, adapters, attn)
            block.to(device)
            out = block_call(i, block, x, e, freqs, ctx, adapters, attn)
            block.to("cpu")  # the write-back those nodes do
            return out
        try:
            to_device_keep_host(blocks, plan.resident, device, saved)
            step, _ = run_steps(blocks, inputs, attention, sync_call, args.steps, args.passes, device)
            results["sync"] = {"step_s": step, **peak_stats(device)}
            print(f"sync .to : {step:8.3f} s/step   peak {fmt_bytes(results['sync']['peak_allocated'])}")
        except torch.OutOfMemoryError:
            results["sync"] = {"error": "out of memory under the cap"}
            print("sync .to : out of memory under the cap")
        finally:
            restore_host(saved)
            for b in swapped:
                blocks[b].to("cpu")
        gc.collect()

    # 3. BlockSwapper -----------------------------------------------------------------------------
    reset_peak(device)
    rss0 = process_rss_bytes()
    swapper = None

    def swap_call(i, block, x, e, freqs, ctx, adapters, attn):
        with swapper.use(i) as blk:
            return block_call(i, blk, x, e, freqs, ctx, adapters, attn)
    try:
        t = time.perf_counter()
        swapper = BlockSwapper(blocks, plan)
        attach_s = time.perf_counter() - t
        step, swapped_out = run_steps(blocks, inputs, attention, swap_call, args.steps, args.passes, device)
        results["swapped"] = {"step_s": step, **peak_stats(device), "attach_s": attach_s,
                              "pinned_bytes": swapper.pinned_bytes, "pageable_bytes": swapper.pageable_bytes,
                              "ring_bytes": swapper.device_bytes, "rss_bytes": process_rss_bytes(),
                              "rss_before_attach": rss0, "loads": swapper.loads}
        print(f"swapped  : {step:8.3f} s/step   peak {fmt_bytes(results['swapped']['peak_allocated'])} "
              f"(reserved {fmt_bytes(results['swapped']['peak_reserved'])}); host pinned "
              f"{fmt_bytes(swapper.pinned_bytes)}, pageable {fmt_bytes(swapper.pageable_bytes)}, RSS "
              f"{fmt_bytes(results['swapped']['rss_bytes'])}; attach {attach_s:.1f} s")
        # One more step with CUDA-event timing (kept out of the timed steps).
        swapper.debug_timing = True
        run_steps(blocks, inputs, attention, swap_call, 0, args.passes, device)
        report = swapper.timing_report()
        print(report)
        rows = swapper.timings()
        results["swapped"]["timing"] = {
            "compute_ms": sum(r.compute_ms for r in rows), "copy_ms": sum(r.copy_ms for r in rows),
            "stall_ms": sum(r.stall_ms for r in rows)}
        if resident_out is not None:
            diff = (swapped_out - resident_out).abs().max().item()
            results["outputs_equal"] = bool(torch.equal(swapped_out, resident_out))
            results["max_abs_diff"] = diff
    except torch.OutOfMemoryError:
        results["swapped"] = {"error": "out of memory under the cap: raise --reserve-gb or swap more blocks"}
        print("swapped  : out of memory under the cap")
    finally:
        if swapper is not None:
            swapper.close()
        if device.type == "cuda" and cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    # summary -------------------------------------------------------------------------------------
    res = results.get("resident", {}).get("step_s")
    for mode in ("swapped", "sync"):
        s = results.get(mode, {}).get("step_s")
        if res and s:
            results[mode]["ratio"] = s / res
    sw = results.get("swapped", {})
    if "ratio" in sw:
        print(f"ratio swapped/resident: {sw['ratio']:.3f} (goal <= 1.05)")
    if "ratio" in results.get("sync", {}):
        print(f"ratio sync .to/resident: {results['sync']['ratio']:.3f}")
    if sw.get("peak_allocated") is not None:
        print(f"peak device memory swapped: {sw['peak_allocated'] / 1e9:.2f} GB "
              f"({sw['peak_allocated'] / GiB:.2f} GiB) allocated, {sw['peak_reserved'] / 1e9:.2f} GB "
              f"({sw['peak_reserved'] / GiB:.2f} GiB) reserved (goal <= 22 GB)")
    measured = results.get("resident", {}).get("activation_measured")
    if measured is not None:
        print(f"activations: estimate {fmt_bytes(plan.activation_bytes)}, measured {fmt_bytes(measured)} "
              "(resident peak minus weights and inputs)")
    if "outputs_equal" in results:
        print(f"swapped output equals resident: {results['outputs_equal']} (max |diff| {results['max_abs_diff']:.3g})")
    line = json.dumps(results, default=str)
    print("RESULT " + line)
    if args.json is not None:
        args.json.write_text(line + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
