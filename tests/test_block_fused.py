"""The fused block steps (lynx_core.fused) against the plain formulas they replace, fp32 and bf16."""
from __future__ import annotations

import copy
import logging
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
def eager(monkeypatch):
    """Eager fused ops unless a test asks otherwise (compiling on the CPU costs seconds)."""
    monkeypatch.setenv(fused.ENV, "0")
    fused.reset()
    yield
    fused.reset()


def _mods(rows, tokens, c, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "per_token":  # Wan2.2 / ComfyUI per-frame modulation, expanded to tokens
        return [torch.randn(rows, tokens, c, generator=g) * 0.3 for _ in range(3)]
    base = [torch.randn(1 if kind == "same_rows" else rows, 1, c, generator=g) * 0.3 for _ in range(3)]
    return [m.expand(rows, 1, c).contiguous() for m in base]


def _bf16_close(got, want):
    """Both round an fp32 value to bf16: equal but for rare one-ulp flips."""
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    assert (got != want).float().mean().item() < 1e-3


@pytest.mark.parametrize("kind", ["one_row", "same_rows", "rows_differ", "per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_modulate_equals_the_formula(kind, dtype):
    rows = 1 if kind == "one_row" else 3
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(rows, 40, 64, generator=g) * 2 + 0.5).to(dtype)
    shift, scale, _ = _mods(rows, 40, 64, kind)
    got = fused.norm_modulate(x, shift, scale, 1e-6)
    want = fused.norm_modulate_formula(x, shift, scale, 1e-6)
    assert got.shape == want.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        _bf16_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_gated_residual_equals_the_formula(dtype, inplace):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 64, generator=g).to(dtype)
    y = torch.randn(3, 40, 64, generator=g).to(dtype)
    gate = torch.randn(3, 1, 64, generator=g) * 0.5
    want = fused.gated_residual_formula(x, y, gate)
    x_in = x.clone()
    got = fused.gated_residual(x_in, y, gate, inplace=inplace)
    assert got.dtype == dtype and (got is x_in) == inplace
    if not inplace:
        assert torch.equal(x_in, x), "not in place: the input is left alone"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        _bf16_close(got, want)


def _residual_inputs(dtype, tokens, gate_kind, strided, seed=8):
    g = torch.Generator().manual_seed(seed)
    c = 64
    x = torch.randn(3, tokens, c, generator=g).to(dtype)
    if strided:  # ComfyUI's block 0 input: a transposed view of the patch embedding, channel-strided
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    y = torch.randn(3, tokens, c, generator=g).to(dtype)
    shape = {"per_row": (3, 1, c), "shared": (1, 1, c), "per_token": (3, tokens, c)}[gate_kind]
    return x, y, torch.randn(*shape, generator=g) * 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("tokens", [1, 37, 301])
@pytest.mark.parametrize("gate_kind", ["per_row", "shared", "per_token"])
def test_chunked_residual_is_the_formula_bit_for_bit(monkeypatch, dtype, inplace, tokens, gate_kind):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 3 * 64 * 5)  # 5-token chunks: 37 and 301 leave a remainder
    x, y, gate = _residual_inputs(dtype, tokens, gate_kind, strided=gate_kind == "per_row")
    want = fused.gated_residual_formula(x, y, gate)
    x_in = x.clone()
    out = x_in if inplace else torch.empty_like(x)
    got = fused.gated_residual_chunked(x_in, y, gate, out)
    assert got is out and got.dtype == dtype
    assert torch.equal(got, want)
    if not inplace:
        assert torch.equal(x_in, x)


@pytest.mark.parametrize("inplace", [False, True])
def test_cpu_bf16_residual_under_inference_mode_is_the_formula(monkeypatch, inplace):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 3 * 64 * 8)
    x, y, gate = _residual_inputs(torch.bfloat16, 301, "per_row", strided=True)
    want = fused.gated_residual_formula(x, y, gate)
    assert not torch.equal(torch.addcmul(x, y, gate).to(x.dtype), want), "inputs where addcmul's FMA shows"
    x_in = x.clone()
    with torch.inference_mode():
        got = fused.gated_residual(x_in, y, gate, inplace=inplace)
    assert torch.equal(got, want) and (got is x_in) == inplace
    if not inplace:
        assert got.is_contiguous(), "a new output is contiguous even for a channel-strided input"
        assert torch.equal(x_in, x)


def test_cpu_bf16_residual_under_no_grad_keeps_addcmul():
    """A plain no-grad forward may be a checkpointed block's first pass: it must round as the
    autograd recompute (addcmul) does, not as the chunked formula."""
    x, y, gate = _residual_inputs(torch.bfloat16, 301, "per_row", strided=False)
    with torch.no_grad():
        got = fused.gated_residual(x.clone(), y, gate)
    assert torch.equal(got, torch.addcmul(x, y, gate).to(x.dtype))
    assert not torch.equal(got, fused.gated_residual_formula(x, y, gate)), "inputs where the two differ"


def test_add_branch_in_place_and_scaled():
    g = torch.Generator().manual_seed(3)
    out, branch = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    want1, want2 = out + branch, out + 0.6 * branch
    a = out.clone()
    assert fused.add_branch(a, branch, 1.0) is a
    torch.testing.assert_close(a, want1)
    b = out.clone()
    assert fused.add_branch(b, branch, 0.6) is b
    torch.testing.assert_close(b, want2)
    # a bf16 branch on an fp32 output is cast, as before
    c = out.clone()
    torch.testing.assert_close(fused.add_branch(c, branch.bfloat16(), 1.0), out + branch.bfloat16().float())


def test_add_branch_under_autograd_is_out_of_place():
    out = torch.randn(2, 5, 8, requires_grad=True)
    branch = torch.randn(2, 5, 8, requires_grad=True)
    res = fused.add_branch(out * 1.0, branch, 0.5)
    res.sum().backward()
    torch.testing.assert_close(branch.grad, torch.full_like(branch, 0.5))
    torch.testing.assert_close(out.grad, torch.ones_like(out))


# ------------------------------------------------------------------------------------------------ the block

class FormulaLayout:
    """A layout without the fused steps: the block then runs the plain formulas (the old code)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def modulate(self, normed, shift, scale):
        return normed * (1 + scale) + shift

    def gate(self, y, gate):
        return y * gate

    def attention(self, kind):
        return self.kernel


@pytest.fixture(scope="module")
def block_setup():
    torch.manual_seed(4)
    model = WanModel(CFG).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    grid = (2, 3, 4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, math.prod(grid), CFG.dim, generator=g)
    e = torch.randn(3, 6, CFG.dim, generator=g) * 0.3
    ctx = torch.randn(3, 7, CFG.dim, generator=g)
    ad = BlockAdapterInputs(ip=(torch.randn(1, 4, CFG.dim, generator=g), torch.randn(1, 4, CFG.dim, generator=g)),
                            ref=(torch.randn(3, 6, CFG.dim, generator=g), torch.randn(3, 6, CFG.dim, generator=g)),
                            ip_scale=1.0, ref_scale=0.7)
    return model.blocks[1], x, e, ctx, rope_freqs(grid, CFG.head_dim), ad


def _cast(ad, dtype):
    return BlockAdapterInputs(ip=tuple(t.to(dtype) for t in ad.ip), ref=tuple(t.to(dtype) for t in ad.ref),
                              ip_scale=ad.ip_scale, ref_scale=ad.ref_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_equals_the_formula_block(block_setup, dtype):
    blk, x, e, ctx, freqs, ad = block_setup
    b = blk if dtype == torch.float32 else copy.deepcopy(blk).to(torch.bfloat16)
    x, ctx, ad = x.to(dtype), ctx.to(dtype), _cast(ad, dtype)
    x_before = x.clone()
    with torch.no_grad():
        got = wan_block_forward(b, x, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa, adapters=ad)
        want = wan_block_forward(b, x, e, freqs, ctx, rope=apply_rope, attention=None, adapters=ad,
                                 layout=FormulaLayout(attention_sdpa))
    assert torch.equal(x, x_before), "the block never writes into its input"
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_under_inference_mode_takes_a_strided_input(block_setup, dtype):
    """ComfyUI runs under inference mode and hands block 0 a channel-strided view: same numbers
    as a contiguous input, the input untouched, the bf16 residuals exactly the formula's."""
    blk, x, e, ctx, freqs, ad = block_setup
    b = blk if dtype == torch.float32 else copy.deepcopy(blk).to(torch.bfloat16)
    x, ctx, ad = x.to(dtype), ctx.to(dtype), _cast(ad, dtype)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    with torch.inference_mode():
        got = wan_block_forward(b, strided, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa, adapters=ad)
        want = wan_block_forward(b, x, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa, adapters=ad)
        formula = wan_block_forward(b, x, e, freqs, ctx, rope=apply_rope, attention=None, adapters=ad,
                                    layout=FormulaLayout(attention_sdpa))
    assert torch.equal(strided, x), "the block never writes into its input"
    assert torch.equal(got, want)
    if dtype == torch.float32:
        torch.testing.assert_close(got, formula, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), formula.float(), rtol=2e-2, atol=2e-2)


def test_fused_block_gradients_equal_the_formula_block(block_setup):
    blk, x, e, ctx, freqs, ad = block_setup
    grads = []
    for layout in (None, FormulaLayout(attention_sdpa)):
        xi = x.clone().requires_grad_(True)
        out = wan_block_forward(blk, xi, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa, adapters=ad,
                                layout=layout)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ policy

def test_compile_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv(fused.ENV, "auto")
    assert fused.compile_mode("cpu") == "eager" and fused.compile_mode("cuda") == "compiled"
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.compile_mode("cpu") == "compiled"
    monkeypatch.setenv(fused.ENV, "0")
    assert fused.compile_mode("cuda") == "eager"


def test_compiled_path_is_used_when_selected(monkeypatch):
    """LYNX_COMPILE=1 runs the torch.compile'd formula (stand-in compiler: counts the calls)."""
    calls = []

    def fake_compile(fn, **kwargs):
        assert kwargs.get("fullgraph") is True

        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return run

    monkeypatch.setenv(fused.ENV, "1")
    monkeypatch.setattr(torch, "compile", fake_compile)
    x, y, gate = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    with torch.no_grad():  # a no-grad forward may be recomputed by autograd (checkpointing): eager
        fused.gated_residual(x, y, gate)
    assert calls == []
    with torch.inference_mode():  # how ComfyUI runs a prompt
        torch.testing.assert_close(fused.gated_residual(x, y, gate), fused.gated_residual_formula(x, y, gate))
        torch.testing.assert_close(fused.norm_modulate(x, gate, gate, 1e-6),
                                   fused.norm_modulate_formula(x, gate, gate, 1e-6))
    assert calls == ["gated_residual_formula", "norm_modulate_formula"]


def test_a_failing_compile_warns_once_and_falls_back(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nlong details")
        return run

    monkeypatch.setenv(fused.ENV, "1")
    monkeypatch.setattr(torch, "compile", broken_compile)
    x, y, gate = torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 1, 8)
    with caplog.at_level(logging.WARNING, logger="lynx_core.fused"), torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(fused.gated_residual(x, y, gate), fused.gated_residual_formula(x, y, gate))
            torch.testing.assert_close(fused.norm_modulate(x, gate, gate, 1e-6),
                                       fused.norm_modulate_formula(x, gate, gate, 1e-6))
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
    assert "LYNX_COMPILE=0" in warnings[0].getMessage()
    assert fused.compile_mode("cpu") == "eager"
