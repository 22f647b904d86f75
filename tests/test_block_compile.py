"""wan_block_forward under torch.compile: one graph (fullgraph=True fails on any break), eager's numbers."""
from __future__ import annotations

import math

import pytest
import torch

import lynx_core.fused as fused
from lynx_core.attention import attention_sdpa
from lynx_core.block import BlockAdapterInputs, wan_block_forward
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope, rope_freqs

CFG = WAN_CONFIGS["tiny"]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    # LYNX_COMPILE=1 would pick the compiled fused steps in eager calls; inside the outer compile
    # the plain formulas must be traced instead (a nested compiled call would not be).
    monkeypatch.setenv(fused.ENV, "1")
    monkeypatch.setattr(fused, "_try_compiled", lambda *a: None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = WanModel(CFG).eval().requires_grad_(False)
    grid = (2, 3, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, math.prod(grid), CFG.dim, generator=g)
    e = torch.randn(3, 6, CFG.dim, generator=g) * 0.3
    ctx = torch.randn(3, 7, CFG.dim, generator=g)
    ad = BlockAdapterInputs(ip=(torch.randn(1, 4, CFG.dim, generator=g), torch.randn(1, 4, CFG.dim, generator=g)),
                            ref=(torch.randn(3, 6, CFG.dim, generator=g), torch.randn(3, 6, CFG.dim, generator=g)),
                            ip_scale=1.0, ref_scale=0.8)
    return model.blocks[1], x, e, ctx, rope_freqs(grid, CFG.head_dim), ad


def _block(blk, x, e, freqs, ctx, ad):
    return wan_block_forward(blk, x, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa, adapters=ad)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_block_compiles_as_one_graph_and_matches_eager(setup, backend):
    blk, x, e, ctx, freqs, ad = setup
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(_block, fullgraph=True, backend=counting)
    with torch.no_grad():
        want = _block(blk, x, e, freqs, ctx, ad)
        got = compiled(blk, x, e, freqs, ctx, ad)
        plain_want = _block(blk, x, e, freqs, ctx, None)
        plain_got = compiled(blk, x, e, freqs, ctx, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain_got, plain_want, rtol=1e-5, atol=1e-5)
    assert (got - plain_got).abs().max().item() > 1e-4, "the adapter branches act in the compiled graph"
    # self, ref, text, ip attention in the adapter graph; self, text in the plain one
    sdpa = [sum("scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes) for gm in graphs]
    assert sdpa == [4, 2]
