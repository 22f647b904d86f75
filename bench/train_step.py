"""Training-step benchmark: 40 Wan-14B-shaped blocks with Lynx-full adapters, resident and swapped.

    python bench/train_step.py                       # the three modes below on one CUDA GPU
    python bench/train_step.py --skip-full           # an 80 GB card: full mode needs ~127 GiB
    python bench/train_step.py --device cpu --tiny   # smoke test (tests/test_train_plan.py runs it)

Modes, in one process on the same random bf16 base (weights do not change the timing):

1. resident_full: every block on the GPU, every Lynx-full adapter weight trains (4.28 B params,
   fp32 masters, AdamW), per-block gradient checkpointing, 33,600 tokens (the paper's per-GPU budget);
2. resident_lora: every block on the GPU, LoRA mode (rank 64 on to_k_ip/to_v_ip/to_k_ref/to_v_ref, plus
   the resampler and registers), ~20k tokens: the reference time for the ratio;
3. swapped_lora: the same LoRA step under a 24 GiB cap (PyTorch's per-process memory fraction, so an
   over-full plan fails as on a 24 GB card), with the plan of ``lynx_core.train.memory_plan``: block
   swap through ``lynx_core.train.swap.SwapRunner``, fp8 host copies of the base, block inputs
   offloaded to pinned host RAM.

A step is what the trainer does: the reference pass (no grad, 256 tokens, through the swapper when
swapping), the ID tokens, every block's adapter keys/values computed outside the block, the blocks
through the runner (the real ``wan_block_forward`` with ID and Ref branches), the head, the flow
loss, backward, gradient clipping and an AdamW step. One packed sample stands in for packing and a
minimal LoRA for the trainer's: the block math and memory traffic are the real ones.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lynx_core.adapters.lynx_adapters import LynxAdapters  # noqa: E402
from lynx_core.attention import get_attention  # noqa: E402
from lynx_core.block import BlockAdapterInputs, wan_block_forward  # noqa: E402
from lynx_core.offload.host import fmt_bytes, physical_ram_bytes  # noqa: E402
from lynx_core.reference import extract_reference_features  # noqa: E402
from lynx_core.train.memory_plan import GiB, TrainPlanError, plan_training  # noqa: E402
from lynx_core.train.runner import ActivationOffload, CheckpointRunner  # noqa: E402
from lynx_core.train.swap import SwapRunner  # noqa: E402
from lynx_core.wan.config import WAN_CONFIGS  # noqa: E402
from lynx_core.wan.model import WanModel  # noqa: E402
from lynx_core.wan.rope import rope_freqs  # noqa: E402

log = logging.getLogger("bench.train_step")

LORA_TARGETS = ("to_k_ip", "to_v_ip", "to_k_ref", "to_v_ref")
GOAL_PEAK_BYTES = 22 * GiB  # a "24 GB" card has 24 GiB; the goal leaves it 2 GiB
GOAL_RATIO = 1.15
GOAL_FULL_BYTES = 141 * 10 ** 9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny widths and tokens: a smoke test that runs anywhere")
    p.add_argument("--blocks", type=int, default=None, help="number of blocks (default 40, tiny 4)")
    p.add_argument("--full-grid", default="21,40,40", help="latent tokens F,H,W of the resident full run (33,600)")
    p.add_argument("--lora-grid", default="13,30,52", help="latent tokens F,H,W of the LoRA runs (20,280 = 480x832x49)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--vram-cap-gb", type=float, default=24.0, help="cap of the swapped mode in GiB (0: none)")
    p.add_argument("--context-gb", type=float, default=0.75,
                   help="part of the cap a real card loses to the CUDA context and the desktop (GiB)")
    p.add_argument("--blocks-to-swap", default="auto", help="a count or 'auto' (the plan's choice)")
    p.add_argument("--no-fp8", action="store_true", help="bf16 host copies instead of fp8")
    p.add_argument("--no-offload", action="store_true", help="keep the block inputs on the device")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash"],
                   help="training kernel (SageAttention never trains)")
    p.add_argument("--skip-full", action="store_true", help="skip the resident full-mode run")
    p.add_argument("--json", type=Path, default=None, help="also write the RESULT to this file")
    return p.parse_args(argv)


def grid_of(text: str) -> tuple[int, int, int]:
    f, h, w = (int(v) for v in text.split(","))
    return f, h, w


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

def build_base(cfg, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanModel:
    """Random frozen Wan DiT, built in place on the device (a 14B base never takes an fp32 detour)."""
    torch.manual_seed(seed)
    if cfg.dim <= 256:
        model = WanModel(cfg).to(device=device, dtype=dtype)
    else:
        with torch.device("meta"):
            model = WanModel(cfg)
        model = model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


class LoRA(torch.nn.Module):
    """Rank-r updates of the adapter projections (a stand-in for the trainer's): B starts at zero."""

    def __init__(self, adapters: LynxAdapters, rank: int, device):
        super().__init__()
        self.scale = 1.0
        self.a = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        for name, mod in adapters.named_modules():
            if name.split(".")[-1] in LORA_TARGETS:
                key = name.replace(".", "_")
                self.a[key] = torch.nn.Parameter(torch.randn(rank, mod.in_features, device=device) / mod.in_features ** 0.5)
                self.b[key] = torch.nn.Parameter(torch.zeros(mod.out_features, rank, device=device))

    def linear(self, name: str, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        key = name.replace(".", "_")
        return layer(x) + F.linear(F.linear(x, self.a[key]), self.b[key]) * self.scale


def build_adapters(cfg, mode: str, device, compute_dtype, rank: int, seed: int = 1):
    """(adapters, lora or None, trainable parameters) with fp32 masters for what trains."""
    torch.manual_seed(seed)
    kw = dict(dim=cfg.dim, num_blocks=cfg.num_layers)
    if cfg.dim <= 256:
        kw.update(resampler_dim=64, resampler_heads=4, resampler_dim_head=16, resampler_depth=2)
    if mode == "full":
        adapters = LynxAdapters.create("full", device=device, dtype=torch.float32, **kw)
        return adapters, None, list(adapters.parameters())
    adapters = LynxAdapters.create("full", device=device, dtype=compute_dtype, **kw).requires_grad_(False)
    trainable = []
    adapters.resampler.float().requires_grad_(True)
    trainable += list(adapters.resampler.parameters())
    for layer in adapters.ip_layers.values():
        if layer.registers is not None:
            layer.registers.data = layer.registers.data.float()
            layer.registers.requires_grad_(True)
            trainable.append(layer.registers)
    lora = LoRA(adapters, rank, device)
    trainable += list(lora.parameters())
    return adapters, lora, trainable


# ------------------------------------------------------------------------------------------------
# one training step
# ------------------------------------------------------------------------------------------------

def rope32(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE in float32 (training does not need the float64 inference parity)."""
    b, s, n, d = x.shape
    xc = torch.view_as_complex(x.float().reshape(b, s, n, d // 2, 2))
    return torch.view_as_real(xc * freqs[:s].view(1, s, 1, d // 2)).flatten(3).to(x.dtype)


def make_step_fn(attention):
    def step(block, x, e, freqs, ctx, k_ip, v_ip, k_ref, v_ref):
        # The key norms are the block's own weights, so they run inside the step, where a swapped
        # block's weights are on the device.
        ad = BlockAdapterInputs(ip=(block.cross_attn.norm_k(k_ip), v_ip), ref=(block.self_attn.norm_k(k_ref), v_ref))
        return wan_block_forward(block, x, e, freqs, ctx, rope=rope32, attention=attention, adapters=ad)
    return step


def make_data(cfg, grid, device, dtype, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    text_len = 512 if cfg.dim > 256 else 16
    x0 = torch.randn(1, 16, f, 2 * h, 2 * w, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    sigma = 0.6
    return dict(
        xt=((1 - sigma) * x0 + sigma * eps).to(device, dtype), target=(eps - x0).to(device),
        t=torch.tensor([sigma * 1000.0], device=device),
        text=torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype),
        ref_latent=torch.randn(1, 16, 1, 32, 32, generator=g).to(device, dtype),
        ref_text=torch.randn(1, 8, cfg.text_dim, generator=g).to(device, dtype),
        face=F.normalize(torch.randn(1, 512, generator=g), dim=-1).to(device),
        freqs=rope_freqs(grid, cfg.head_dim).to(device=device, dtype=torch.complex64),
    )


def train_step(model, adapters, lora, runner, ref_runner, data, step_fn, params, opt, device, dtype,
               keep_grads: bool = False):
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    feats = extract_reference_features(model, data["ref_latent"], data["ref_text"], block_runner=ref_runner)
    tokens, grid, e, temb, ctx, _freqs = model.embed(data["xt"], data["t"], data["text"])
    with autocast:
        ids = adapters.encode_identity(data["face"])
        kvs = []
        for i in range(len(model.blocks)):
            ip, ref = adapters.ip_layer(i), adapters.ref_layer(i)
            toks = ip.tokens_with_registers(ids.to(ip.to_k_ip.weight.dtype))
            f = feats[i].to(ref.to_k_ref.weight.dtype)
            if lora is None:
                kv = (ip.to_k_ip(toks), ip.to_v_ip(toks), ref.to_k_ref(f), ref.to_v_ref(f))
            else:
                kv = (lora.linear(f"ip_layers.{i}.to_k_ip", ip.to_k_ip, toks),
                      lora.linear(f"ip_layers.{i}.to_v_ip", ip.to_v_ip, toks),
                      lora.linear(f"ref_layers.{i}.to_k_ref", ref.to_k_ref, f),
                      lora.linear(f"ref_layers.{i}.to_v_ref", ref.to_v_ref, f))
            kvs.append(tuple(t.to(dtype) for t in kv))
    h = tokens
    for i, block in enumerate(model.blocks):
        h = runner(i, block, step_fn, h, e, data["freqs"], ctx, *kvs[i])
    out = model.unpatchify(model.head(h, temb), grid)
    loss = F.mse_loss(out.float(), data["target"])
    loss.backward()
    grads = [p.grad.detach().float().cpu().clone() for p in params] if keep_grads else None
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), grads


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(name: str, args, model, cfg, mode: str, grid, device, dtype, *, runner_factory, plan=None,
             keep_grads=False) -> tuple[dict, list | None]:
    res: dict = {"mode": mode, "tokens": math.prod(grid)}
    if plan is not None:
        res["plan_peak_gib"] = round(plan.peak_bytes / GiB, 2)
    adapters = lora = opt = None
    grads = None
    try:
        adapters, lora, params = build_adapters(cfg, mode, device, dtype, args.lora_rank)
        res["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
        data = make_data(cfg, grid, device, dtype)
        runner, ref_runner = runner_factory()
        step_fn = make_step_fn(get_attention(args.attention))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        loss, grads = train_step(model, adapters, lora, runner, ref_runner, data, step_fn, params, opt, device, dtype,
                                 keep_grads=keep_grads)
        losses.append(loss)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            losses.append(train_step(model, adapters, lora, runner, ref_runner, data, step_fn, params, opt,
                                     device, dtype)[0])
        sync(device)
        res["step_s"] = round((time.perf_counter() - t0) / max(args.steps, 1), 4)
        res["losses"] = [round(v, 6) for v in losses]
        if device.type == "cuda":
            res["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(device) / GiB, 2)
            res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GiB, 2)
        print(f"{name:14s}: {res['step_s']:.3f} s/step at {res['tokens']:,} tokens"
              + (f", peak {res['peak_alloc_gib']} GiB allocated / {res['peak_reserved_gib']} GiB reserved"
                 if "peak_alloc_gib" in res else ""), flush=True)
    except torch.cuda.OutOfMemoryError as err:  # e.g. full mode on an 80 GB card
        res["error"] = f"out of memory: {str(err).splitlines()[0]}"
        print(f"{name:14s}: {res['error']}", flush=True)
    finally:
        del adapters, lora, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res, grads


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.json is not None and args.json.exists():
        raise SystemExit(f"--json {args.json} exists; results are never overwritten: give a new path")
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny matmuls are dominated by thread synchronisation
    try:
        return _run(args, device, dtype)
    finally:
        torch.set_num_threads(threads)


def _run(args, device: torch.device, dtype: torch.dtype) -> dict:
    base_cfg = WAN_CONFIGS["tiny" if args.tiny else "14B"]
    n = args.blocks or base_cfg.num_layers
    cfg = base_cfg.with_(num_layers=n)
    full_grid = (2, 8, 8) if args.tiny else grid_of(args.full_grid)
    lora_grid = (2, 6, 8) if args.tiny else grid_of(args.lora_grid)
    fp8, offload = not args.no_fp8, not args.no_offload

    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                    "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "blocks": n, "dim": cfg.dim, "tiny": args.tiny, "steps": args.steps}
    t0 = time.perf_counter()
    model = build_base(cfg, device, dtype)
    model.attention = get_attention(args.attention)
    print(f"base: {n} blocks of width {cfg.dim} ({fmt_bytes(sum(p.numel() * p.element_size() for p in model.parameters()))}) "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)

    def resident():
        return CheckpointRunner(), None

    if not args.skip_full:
        result["resident_full"], _ = run_mode("resident_full", args, model, cfg, "full", full_grid, device, dtype,
                                              runner_factory=resident)
    result["resident_lora"], ref_grads = run_mode("resident_lora", args, model, cfg, "lora", lora_grid, device, dtype,
                                                  runner_factory=resident, keep_grads=True)

    # ---- the 24 GB plan
    cap = int(args.vram_cap_gb * GiB) if args.vram_cap_gb > 0 else None
    plan_total = cap if cap is not None else 24 * GiB
    with torch.device("meta"):
        shape_adapters = LynxAdapters.create("full", dim=cfg.dim, num_blocks=n,
                                             **({} if cfg.dim > 256 else dict(resampler_dim=64, resampler_heads=4,
                                                                              resampler_dim_head=16, resampler_depth=2)))
    try:
        plan = plan_training(model, shape_adapters, tokens=math.prod(lora_grid), mode="lora", lora_rank=args.lora_rank,
                             fp8_base=fp8, offload_activations=offload, device=str(device),
                             device_total_bytes=plan_total,
                             device_free_bytes=plan_total - int(args.context_gb * GiB),
                             host_ram_bytes=physical_ram_bytes(), compute_dtype=dtype)
        print(plan.describe(), flush=True)
        k = plan.blocks_to_swap
    except TrainPlanError as err:
        print(f"plan: {err}", flush=True)
        plan, k = None, n
    if args.blocks_to_swap != "auto":
        k = int(args.blocks_to_swap)
    elif args.tiny:
        k = max(1, n // 2)  # tiny blocks fit anywhere: swap half to exercise the path
    swap_runner = SwapRunner.attach(model.blocks, k, device, fp8_base=fp8,
                                    offload_activations=ActivationOffload() if offload else False)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            if cap is not None:
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, (cap - args.context_gb * GiB) / total), device)
        res, grads = run_mode("swapped_lora", args, model, cfg, "lora", lora_grid, device, dtype,
                              runner_factory=lambda: (swap_runner, swap_runner.forward_runner(model)), plan=plan,
                              keep_grads=True)
        res.update(blocks_swapped=len(swap_runner.swapped), fp8_base=fp8, offload_activations=offload,
                   host_pinned_gib=round(swap_runner.swapper.pinned_bytes / GiB, 2))
        if grads is not None and ref_grads is not None:
            res["grads_equal_resident"] = all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
            num = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
            den = max(float(b.abs().max()) for b in ref_grads) or 1.0
            res["grad_max_rel_diff"] = num / den
        result["swapped_lora"] = res
    finally:
        swap_runner.close()
        if device.type == "cuda" and cap is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    ref_s, swap_s = result["resident_lora"].get("step_s"), result["swapped_lora"].get("step_s")
    if ref_s and swap_s:
        result["ratio_swapped_over_resident"] = round(swap_s / ref_s, 3)
        print(f"ratio swapped/resident (LoRA, {math.prod(lora_grid):,} tokens): "
              f"{result['ratio_swapped_over_resident']} (goal <= {GOAL_RATIO})", flush=True)
    if device.type == "cuda" and not args.tiny:
        full = result.get("resident_full", {})
        swap_peak = result["swapped_lora"].get("peak_reserved_gib")
        result["goals"] = {
            "swapped_peak_le_22GB": swap_peak is not None and swap_peak * GiB <= GOAL_PEAK_BYTES,
            "swapped_ratio_le_1.15": result.get("ratio_swapped_over_resident", 9e9) <= GOAL_RATIO,
            "full_fits_141GB": "peak_reserved_gib" in full and full["peak_reserved_gib"] * GiB <= GOAL_FULL_BYTES,
        }
    line = json.dumps(result, sort_keys=True)
    print("RESULT " + line, flush=True)
    if args.json is not None:
        args.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
