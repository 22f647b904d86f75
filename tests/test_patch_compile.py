"""The Lynx block patch under torch.compile, without ComfyUI.

ComfyUI's TorchCompileModel compiles the whole diffusion model (``torch.compile(diffusion_model)``,
applied by an APPLY_MODEL wrapper); dynamo then traces Wan's block loop and, through
``patches_replace["dit"]``, our :class:`nodes.wan_patch.LynxBlockPatch`: the run state, the row
identities, the cached adapter keys/values, ComfyUI's attention entry point. Here a loop shaped
like ComfyUI's ``WanModel.forward_orig`` runs the patch on lynx_core's reference DiT (same module
names), with a stand-in ``comfy.ldm.modules.attention`` whose ``optimized_attention`` takes
``transformer_options`` as ComfyUI's does. ``fullgraph=True`` fails on any graph break.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

import nodes.wan_patch as wp
from lynx_core.adapters import LynxAdapters
from lynx_core.attention import attention_sdpa
from lynx_core.block import wan_block_forward
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope

CFG = WAN_CONFIGS["tiny"].with_(num_layers=2)  # tracing time grows with the block count


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture()
def comfy_attention_module(monkeypatch):
    """``comfy.ldm.modules.attention.optimized_attention`` as ComfyUI calls it; records the options."""
    seen = {}  # a dict with a fixed key, so recording does not change what dynamo guards on

    def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                            skip_output_reshape=False, transformer_options={}):
        seen["marker"] = transformer_options.get("marker")
        return attention_sdpa(q, k, v, heads)

    attn = types.ModuleType("comfy.ldm.modules.attention")
    attn.optimized_attention = optimized_attention
    for name in ("comfy", "comfy.ldm", "comfy.ldm.modules"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "comfy.ldm.modules.attention", attn)
    sys.modules["comfy.ldm.modules"].attention = attn
    # ComfyUI's RoPE takes its own real-valued table layout; the reference DiT's complex table
    # goes with lynx_core's rotation (the same math; test_nodes_patch covers the row mapping).
    monkeypatch.setattr(wp, "comfy_rope", apply_rope)
    return seen


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = WanModel(CFG).eval().requires_grad_(False)
    adapters = LynxAdapters.create("full", dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=64,
                                   resampler_heads=1, resampler_dim_head=64, resampler_depth=1).eval()
    g = torch.Generator().manual_seed(1)
    refs = [{b: torch.randn(1, 8, CFG.dim, generator=g) for b in range(CFG.num_layers)} for _ in range(2)]
    emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    conditioning = make_conditioning(adapters, emb, refs[0], refs[1])
    return model, adapters, conditioning


def _state(model, adapters, conditioning, dtype=torch.float32):
    patch = LynxPatch(adapters, conditioning, ip_scale=0.9, ref_scale=1.1)
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks), cond_identities=[COND, UNCOND, COND])
    # What the guider does before the first step (prepare_run): every key/value cached.
    state.prepare_run("cpu", dtype, (1, 16, 2, 8, 8))
    return state


def _comfy_like_forward(model):
    """ComfyUI's block loop: replace patches get (args, {"original_block": ...})."""
    def original(block):
        def run(args):
            return {"img": wan_block_forward(block, args["img"], args["vec"], args["pe"], args["txt"],
                                             rope=apply_rope, attention=attention_sdpa)}
        return run

    def forward(x, e, context, freqs, transformer_options):
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(model.blocks):
            key = ("double_block", i)
            if key in blocks_replace:
                out = blocks_replace[key]({"img": x, "txt": context, "vec": e, "pe": freqs,
                                           "transformer_options": transformer_options},
                                          {"original_block": original(block)})
                x = out["img"]
            else:
                x = original(block)({"img": x, "txt": context, "vec": e, "pe": freqs})["img"]
        return x
    return forward


def _inputs(model, seed, rows=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(rows, 6, CFG.text_dim, generator=g)
    with torch.no_grad():
        tokens, _grid, e, _temb, c, freqs = model.embed(x.expand(rows, -1, -1, -1, -1), torch.tensor([600.0] * rows), ctx)
    return tokens.to(dtype).contiguous(), e, c.to(dtype), freqs


def _options(state, marker="opts"):
    return {"patches_replace": {"dit": {("double_block", i): wp.LynxBlockPatch(i, state)
                                        for i in range(len(state.blocks))}},
            "cond_or_uncond": [0, 1, 2], "marker": marker}


def test_patch_compiles_without_graph_breaks_and_matches_eager(setup, comfy_attention_module):
    model, adapters, conditioning = setup
    state = _state(model, adapters, conditioning)
    forward = _comfy_like_forward(model)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(forward, fullgraph=True, backend=counting_backend)
    opts = _options(state)
    with torch.no_grad():
        for seed in (1, 2):  # a second step: new values, same shapes -> no recompile
            x, e, c, freqs = _inputs(model, seed)
            eager = forward(x, e, c, freqs, opts)
            out = compiled(x, e, c, freqs, opts)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    # the adapters did act, per row: the face rows differ from the no-identity row
    assert (out[0] - out[1]).abs().max().item() > 1e-4
    # every attention call went through ComfyUI's entry point with the model call's options
    assert comfy_attention_module == {"marker": "opts"}
    # the compiled graph holds the adapter attention: 4 attention calls per block (self, ref, text, ip)
    assert sum(1 for n in graphs[0].graph.nodes if "scaled_dot_product_attention" in str(n.target)) == 4 * CFG.num_layers


def test_window_off_runs_comfyuis_block_in_the_same_compiled_loop(setup, comfy_attention_module):
    model, adapters, conditioning = setup
    state = _state(model, adapters, conditioning)
    forward = _comfy_like_forward(model)
    compiled = torch.compile(forward, fullgraph=True, backend="eager")
    opts = _options(state)
    x, e, c, freqs = _inputs(model, 3)
    with torch.no_grad():
        on = compiled(x, e, c, freqs, opts)
        state.patch.active = False  # outside start/end: the guard on `active` picks the plain graph
        off = compiled(x, e, c, freqs, opts)
        plain = forward(x, e, c, freqs, {})
    torch.testing.assert_close(off, plain, rtol=1e-5, atol=1e-5)
    assert (on - off).abs().max().item() > 1e-4


def test_bf16_compiled_matches_eager_within_bf16_tolerance(setup, comfy_attention_module):
    model, adapters, conditioning = setup
    bf = WanModel(CFG).eval().requires_grad_(False)
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16)
    state = _state(bf, adapters, conditioning, dtype=torch.bfloat16)
    forward = _comfy_like_forward(bf)
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    x, e, c, freqs = _inputs(model, 4, dtype=torch.bfloat16)
    opts = _options(state)
    with torch.no_grad():
        eager = forward(x, e, c, freqs, opts).float()
        out = compiled(x, e, c, freqs, opts).float()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - eager).abs().max().item() <= 2e-2 * max(1.0, eager.abs().max().item())


def test_patch_compiled_as_its_own_frame_per_block(setup, comfy_attention_module):
    """Where graph breaks outside the patch (ComfyUI's own, e.g. its CPU attention's memory probe)
    make dynamo compile each block patch call as a frame of its own, the second block index turns
    the index into a symbolic int; the patch must still trace without a break."""
    model, adapters, conditioning = setup
    state = _state(model, adapters, conditioning)
    x, e, c, freqs = _inputs(model, 5)
    opts = _options(state)
    patches = opts["patches_replace"]["dit"]
    call = torch.compile(lambda patch, args, extra: patch(args, extra)["img"], fullgraph=True, backend="eager")
    with torch.no_grad():
        h = x
        for i in range(CFG.num_layers):
            args = {"img": h, "txt": c, "vec": e, "pe": freqs, "transformer_options": opts}
            h = call(patches[("double_block", i)], args, {"original_block": None})
        eager = _comfy_like_forward(model)(x, e, c, freqs, opts)
    torch.testing.assert_close(h, eager, rtol=1e-5, atol=1e-5)


def test_block_swap_under_compile_gives_the_resident_result(setup, comfy_attention_module):
    """With a swapper the patch streams the block around the compiled compute: the swap itself
    (pointer switches, copies) runs eagerly, the block math is still compiled, the numbers equal
    the resident run. (On a GPU the swapper's copy stream is involved too; see bench/gpu_suite.sh.)"""
    from lynx_core.offload import BlockSwapper, plan_block_swap

    model, adapters, conditioning = setup
    state = _state(model, adapters, conditioning)
    forward = _comfy_like_forward(model)
    x, e, c, freqs = _inputs(model, 6)
    opts = _options(state)
    swapper = BlockSwapper(model.blocks, plan_block_swap(model.blocks, CFG.num_layers, "cpu", ring_size=1))
    with torch.no_grad():
        resident = forward(x, e, c, freqs, opts)
        state.swapper = swapper
        try:
            with swapper:
                torch._dynamo.utils.counters.clear()
                out = torch.compile(forward, backend="eager")(x, e, c, freqs, opts)
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                loads = swapper.loads
        finally:
            state.swapper = None
    torch.testing.assert_close(out, resident, rtol=1e-5, atol=1e-5)
    assert loads >= CFG.num_layers and graphs >= 1
