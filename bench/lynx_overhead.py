"""What the Lynx patch costs over plain Wan: Lynx-patched / plain time, calls alternating in one process.

    python bench/lynx_overhead.py                                   # CPU, small Wan, fp32 and bf16
    python bench/lynx_overhead.py --shape 14b --device cuda         # 14B-wide blocks at 480x832x81
    python bench/lynx_overhead.py --shape tiny --rounds 2           # smoke test (tests/test_bench_smoke.py)

Figures (each in every ``--dtypes``; every key ending in ``_ratio`` is Lynx / plain, median over rounds):

* ``model_ratio``: one 3-row call (cond, uncond, image-only) of ComfyUI's own ``WanModel``, plain vs
  with the Lynx block patch of ``nodes.wan_patch`` on every block (real adapters, cached keys/values);
* ``block_ratio`` / ``block_noadapters_ratio``: ComfyUI's ``WanAttentionBlock`` vs
  ``lynx_core.block.wan_block_forward`` on the same block, 3 rows, with the adapter branches on / off;
* ``core_block_ratio``: lynx_core's reference DiT block, ``wan_block_forward`` with / without the
  adapter branches (runs without ComfyUI);
* ``*_flop_ratio`` next to them: the same ratio of matmul FLOPs (the adapter branches' inherent
  cost), to read each measured ratio against.

The ComfyUI figures need ComfyUI: ``COMFYUI_PATH`` (or ``--comfyui``) names its folder; without one
they are skipped. The reference token count is scaled with the video tokens as in Lynx-full at 14B,
480x832x81 (256 per 32,760); the 32 ID tokens are not, so at small shapes the branches' share of
the FLOPs is larger than at 14B (``*_flop_ratio`` says how much: 1.012 for ``small``, 1.0046 at 14B).
Every figure prints one ``RESULT {json}`` line; the last line sums them all up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VIDEO_TOKENS_14B = 32760  # 480x832x81: 21 latent frames of 30x52 patches
REF_TOKENS_14B = 256


@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    ffn: int
    blocks: int
    latent: tuple[int, int, int]  # latent frames, height, width (patches are 1x2x2)
    text: int                     # text tokens (ComfyUI pads UMT5 to 512)

    @property
    def tokens(self) -> int:
        t, h, w = self.latent
        return t * (h // 2) * (w // 2)

    @property
    def ref_tokens(self) -> int:
        return max(1, round(REF_TOKENS_14B * self.tokens / VIDEO_TOKENS_14B))


SHAPES = {
    "tiny": Shape(dim=128, heads=2, ffn=256, blocks=1, latent=(1, 8, 8), text=16),
    # one 480x832 latent frame: tokens/width as at 14B, so attention's share is realistic
    "small": Shape(dim=256, heads=2, ffn=704, blocks=2, latent=(1, 60, 104), text=512),
    "14b": Shape(dim=5120, heads=40, ffn=13824, blocks=2, latent=(21, 60, 104), text=512),
}
IP_TOKENS = 32  # Lynx-full: 16 ID tokens + 16 registers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--blocks", type=int, default=None, help="blocks of the model call (default: the shape's)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--rounds", type=int, default=7, help="timed (plain, lynx) pairs per figure, after one warm-up")
    p.add_argument("--parts", default="model,block,core", help="comma-separated: model, block, core")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder (default $COMFYUI_PATH)")
    p.add_argument("--lynx-compile", choices=["auto", "on", "off"], default=None,
                   help="sets LYNX_COMPILE for the fused block ops (default: leave the environment as it is)")
    p.add_argument("--compile-model", action="store_true",
                   help="torch.compile the diffusion model (both variants), as ComfyUI's TorchCompileModel does")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1, steadier on a shared machine)")
    p.add_argument("--json", type=Path, default=None, help="also write every RESULT to this new file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device):
    """Wall time on an accelerator; on the CPU the process's CPU time, which other processes on a
    shared machine barely disturb (they still share caches and memory bandwidth)."""
    return time.perf_counter if device.type != "cpu" else time.process_time


def alternate(calls: dict, rounds: int, device: torch.device) -> dict:
    """Time the calls in turn (one warm-up each, then ``rounds`` rounds); per-round ratios to 'plain'."""
    times = {name: [] for name in calls}
    now = clock(device)
    with torch.inference_mode():  # as ComfyUI runs a prompt
        for fn in calls.values():
            fn()
        _sync(device)
        for _ in range(rounds):
            for name, fn in calls.items():
                _sync(device)
                t0 = now()
                fn()
                _sync(device)
                times[name].append(now() - t0)
    out = {f"{name}_ms": round(1e3 * statistics.median(ts), 3) for name, ts in times.items()}
    for name, ts in times.items():
        if name == "plain":
            continue
        ratios = sorted(a / b for a, b in zip(ts, times["plain"]))
        out[f"{name}_ratio"] = round(statistics.median(ratios), 4)
        out[f"{name}_spread"] = [round(ratios[0], 4), round(ratios[-1], 4)]
        out[f"{name}_ratio_of_fastest"] = round(min(ts) / min(times["plain"]), 4)
    return out


# ------------------------------------------------------------------------------------------------ FLOPs

def block_flops(shape: Shape, adapters: bool) -> int:
    """Matmul FLOPs of one block for one row (elementwise steps left out): what a ratio of times
    would be if every FLOP cost the same. The adapter keys/values are computed once per
    generation, so a pass only adds the two branch attentions (4·C per query token and key)."""
    c, n, text = shape.dim, shape.tokens, shape.text
    per_token = (4 * 2 * c * c            # self-attention q, k, v, o
                 + 4 * n * c              # self-attention scores and values
                 + 2 * 2 * c * c          # cross-attention q, o
                 + 4 * text * c           # cross-attention over the text
                 + 2 * 2 * c * shape.ffn)  # FFN
    if adapters:
        per_token += 4 * (shape.ref_tokens + IP_TOKENS) * c
    return n * per_token + text * 2 * 2 * c * c  # + the text keys/values


def model_flops(shape: Shape, blocks: int, adapters: bool) -> int:
    """One row of a model call: the blocks plus patch embedding, head and text embedding."""
    c, n = shape.dim, shape.tokens
    outside = n * 2 * 2 * c * 64 + shape.text * 2 * (4096 * c + c * c)  # 16 channels x 1x2x2 in and out
    return blocks * block_flops(shape, adapters) + outside


def flop_ratio(lynx: int, plain: int) -> float:
    return round(lynx / plain, 4)


# ------------------------------------------------------------------------------------------------ models

def _fill_random(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave parameters uninitialised: fan-in scaled noise, unit norms, zero biases."""
    gens: dict = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = gens.get(p.device)
            if g is None:  # drawn where the parameter lives: 14B-wide blocks fill in seconds on a GPU
                g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim == 1 and "norm" in name and leaf == "weight":
                p.fill_(1.0)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.01)
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) / fan_in ** 0.5)


def import_comfy(path: str | None, device: torch.device):
    """ComfyUI's Wan model module from the folder ``path`` (None: not available)."""
    if not path or not (Path(path) / "comfy").is_dir():
        return None
    # The pack's own ``nodes`` package must win over ComfyUI's top-level nodes.py.
    for entry in (str(ROOT), str(Path(path).resolve())):
        if entry in sys.path:
            sys.path.remove(entry)
    sys.path.insert(0, str(Path(path).resolve()))
    sys.path.insert(0, str(ROOT))
    from comfy.cli_args import args as comfy_args

    if device.type == "cpu":
        comfy_args.cpu = True
    import comfy.ldm.wan.model as wan_model  # noqa: F401
    import comfy.ops  # noqa: F401

    return sys.modules["comfy"]


def build_comfy_model(comfy, shape: Shape, blocks: int, dtype: torch.dtype, device: torch.device):
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=shape.dim,
                     ffn_dim=shape.ffn, freq_dim=256, text_dim=4096, out_dim=16, num_heads=shape.heads,
                     num_layers=blocks, qk_norm=True, cross_attn_norm=True, eps=1e-6,
                     device=device, dtype=dtype, operations=comfy.ops.disable_weight_init)
    _fill_random(model, seed=0)
    return model.eval()


def lynx_state(model, shape: Shape, device: torch.device, dtype: torch.dtype, rows: int):
    """The run state the Lynx nodes build: random full adapters, cached keys/values for every block."""
    from lynx_core.adapters import LynxAdapters
    from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
    from nodes.wan_patch import LynxRunState

    blocks = list(model.blocks)
    small = shape.dim <= 256
    adapters = LynxAdapters.create("full", dim=shape.dim, num_blocks=len(blocks),
                                   resampler_dim=64 if small else 1280, resampler_heads=1 if small else 20,
                                   resampler_depth=1 if small else 4).eval()
    _fill_random(adapters, seed=1)
    g = torch.Generator().manual_seed(2)
    refs = [{b: torch.randn(1, shape.ref_tokens, shape.dim, generator=g) for b in range(len(blocks))}
            for _ in range(2)]
    emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    patch = LynxPatch(adapters, make_conditioning(adapters, emb, refs[0], refs[1]))
    patch.precompute(blocks, device, dtype)
    idents = [COND, UNCOND, COND][:rows] + [COND] * max(0, rows - 3)
    return LynxRunState(patch=patch, blocks=blocks, cond_identities=idents)


def model_figure(comfy, shape: Shape, blocks: int, dtype: torch.dtype, device: torch.device, rounds: int,
                 compile_model: bool) -> dict:
    from nodes.wan_patch import LynxBlockPatch

    rows = 3
    model = build_comfy_model(comfy, shape, blocks, dtype, device)
    state = lynx_state(model, shape, device, dtype, rows)
    g = torch.Generator().manual_seed(3)
    t, h, w = shape.latent
    x = torch.randn(rows, 16, t, h, w, generator=g).to(device=device, dtype=dtype)
    ts = torch.full((rows,), 500.0, device=device)
    ctx = torch.randn(rows, shape.text, 4096, generator=g).to(device=device, dtype=dtype)
    plain_to = {"cond_or_uncond": [0, 1, 2]}
    lynx_to = {"cond_or_uncond": [0, 1, 2],
               "patches_replace": {"dit": {("double_block", i): LynxBlockPatch(i, state) for i in range(blocks)}}}
    forward = torch.compile(model) if compile_model else model
    calls = {"plain": lambda: forward(x, ts, ctx, transformer_options=plain_to),
             "model": lambda: forward(x, ts, ctx, transformer_options=lynx_to)}
    return dict(alternate(calls, rounds, device),
                model_flop_ratio=flop_ratio(model_flops(shape, blocks, True), model_flops(shape, blocks, False)))


def block_inputs(model, shape: Shape, dtype: torch.dtype, device: torch.device, rows: int):
    """Block 0's real inputs from one plain model call (hidden state, modulation, RoPE, text)."""
    seen = {}

    def grab(args, extra):
        seen.update(args)
        return extra["original_block"](args)

    g = torch.Generator().manual_seed(4)
    t, h, w = shape.latent
    x = torch.randn(rows, 16, t, h, w, generator=g).to(device=device, dtype=dtype)
    ctx = torch.randn(rows, shape.text, 4096, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        model(x, torch.full((rows,), 500.0, device=device), ctx,
              transformer_options={"patches_replace": {"dit": {("double_block", 0): grab}}})
    return seen["img"], seen["vec"], seen["pe"], seen["txt"]


def adapter_kv(shape: Shape, rows: int, dtype: torch.dtype, device: torch.device, seed: int = 5):
    from lynx_core.block import BlockAdapterInputs

    g = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(rows, n, shape.dim, generator=g) * 0.5).to(device=device, dtype=dtype)
          for n in (IP_TOKENS, IP_TOKENS, shape.ref_tokens, shape.ref_tokens)]
    return BlockAdapterInputs(ip=(kv[0], kv[1]), ref=(kv[2], kv[3]))


def block_figure(comfy, shape: Shape, dtype: torch.dtype, device: torch.device, rounds: int) -> dict:
    from lynx_core.block import wan_block_forward
    from nodes.wan_patch import comfy_attention, comfy_rope

    rows = 3
    model = build_comfy_model(comfy, shape, 1, dtype, device)
    x, e, freqs, ctx = block_inputs(model, shape, dtype, device, rows)
    block = model.blocks[0]
    ad = adapter_kv(shape, rows, dtype, device)
    attention = comfy_attention({})
    calls = {
        "plain": lambda: block(x, e=e, freqs=freqs, context=ctx, transformer_options={}),
        "block": lambda: wan_block_forward(block, x, e, freqs, ctx, rope=comfy_rope, attention=attention, adapters=ad),
        "block_noadapters": lambda: wan_block_forward(block, x, e, freqs, ctx, rope=comfy_rope, attention=attention),
    }
    return dict(alternate(calls, rounds, device),
                block_flop_ratio=flop_ratio(block_flops(shape, True), block_flops(shape, False)))


def core_figure(shape: Shape, dtype: torch.dtype, device: torch.device, rounds: int) -> dict:
    """No ComfyUI: lynx_core's reference block with / without the adapter branches."""
    sys.path.insert(0, str(ROOT))
    from lynx_core.attention import get_attention
    from lynx_core.block import wan_block_forward
    from lynx_core.wan.config import WanConfig
    from lynx_core.wan.model import WanBlock
    from lynx_core.wan.rope import apply_rope, rope_freqs

    rows = 3
    cfg = WanConfig(dim=shape.dim, ffn_dim=shape.ffn, num_heads=shape.heads, num_layers=1, text_dim=shape.dim)
    block = WanBlock(cfg).to(device=device, dtype=dtype).eval()
    _fill_random(block, seed=6)
    g = torch.Generator().manual_seed(7)
    t, h, w = shape.latent
    grid = (t, h // 2, w // 2)
    x = torch.randn(rows, shape.tokens, shape.dim, generator=g).to(device=device, dtype=dtype)
    e = (torch.randn(rows, 6, shape.dim, generator=g) * 0.1).to(device)
    ctx = torch.randn(rows, shape.text, shape.dim, generator=g).to(device=device, dtype=dtype)
    freqs = rope_freqs(grid, cfg.head_dim, device=device)
    ad = adapter_kv(shape, rows, dtype, device)
    attention = get_attention("sdpa")
    calls = {
        "plain": lambda: wan_block_forward(block, x, e, freqs, ctx, rope=apply_rope, attention=attention),
        "core_block": lambda: wan_block_forward(block, x, e, freqs, ctx, rope=apply_rope, attention=attention,
                                                adapters=ad),
    }
    return dict(alternate(calls, rounds, device),
                core_block_flop_ratio=flop_ratio(block_flops(shape, True), block_flops(shape, False)))


# ------------------------------------------------------------------------------------------------ main

def emit(result: dict, sink: list) -> None:
    sink.append(result)
    print("RESULT " + json.dumps(result), flush=True)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.lynx_compile is not None:
        os.environ["LYNX_COMPILE"] = {"auto": "auto", "on": "1", "off": "0"}[args.lynx_compile]
    sys.path.insert(0, str(ROOT))
    device = torch.device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    shape = SHAPES[args.shape]
    blocks = args.blocks or shape.blocks
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"model", "block", "core"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; use model, block, core")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {d!r}; use {', '.join(DTYPES)}")
    comfy = import_comfy(args.comfyui, device) if parts & {"model", "block"} else None
    if parts & {"model", "block"} and comfy is None:
        print(f"ComfyUI not found (COMFYUI_PATH={args.comfyui!r}): skipping the model and block figures",
              flush=True)
    try:
        from lynx_core.fused import compile_mode
    except ImportError:  # before lynx_core.fused existed (baseline measurements)
        compile_mode = lambda _device: "none"  # noqa: E731

    base = {"figure": "lynx_overhead", "device": str(device), "shape": args.shape, "tokens": shape.tokens,
            "dim": shape.dim, "threads": torch.get_num_threads(), "lynx_compile": compile_mode(device),
            "clock": "cpu_time" if device.type == "cpu" else "wall"}
    if device.type == "cuda":
        base["gpu"] = torch.cuda.get_device_name(device)
    results: list[dict] = []
    summary = dict(base, part="summary")
    for name in dtypes:
        dtype = DTYPES[name]
        figures = []
        if comfy is not None and "model" in parts:
            figures.append(("model", lambda: model_figure(comfy, shape, blocks, dtype, device, args.rounds,
                                                          args.compile_model)))
        if comfy is not None and "block" in parts:
            figures.append(("block", lambda: block_figure(comfy, shape, dtype, device, args.rounds)))
        if "core" in parts:
            figures.append(("core", lambda: core_figure(shape, dtype, device, args.rounds)))
        for part, run in figures:
            try:
                res = run()
            except Exception as err:  # one failing figure (e.g. out of memory) must not hide the rest
                emit(dict(base, part=part, dtype=name, error=f"{type(err).__name__}: {err}"), results)
                continue
            emit(dict(base, part=part, dtype=name, blocks=blocks if part == "model" else 1,
                      compiled_model=bool(args.compile_model and part == "model"), **res), results)
            for key, value in res.items():
                if key.endswith("_ratio"):
                    summary[f"{key[:-len('_ratio')]}_{name}_ratio"] = value
            if device.type == "cuda":
                torch.cuda.empty_cache()
    emit(summary, results)
    if args.json is not None:
        with open(args.json, "x") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
