"""The Lynx block against a plain, separately written transcription of the spec's formulas."""
import math

import pytest
import torch

from lynx_core.block import BlockAdapterInputs, wan_block_forward
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope, axis_dims, rope_freqs
from lynx_core.attention import attention_sdpa

CFG = WAN_CONFIGS["tiny"]
torch.manual_seed(0)


# ---------------- plain reference (explicit loops, real-valued RoPE, explicit softmax) -------------
def ref_rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_ln(x, eps=1e-6, w=None, b=None):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * w + b if w is not None else y


def ref_attn(q, k, v, heads):
    B, Lq, C = q.shape
    d = C // heads
    out = torch.zeros(B, Lq, C, dtype=q.dtype)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        out[..., sl] = torch.softmax(logits, -1) @ v[..., sl]
    return out


def ref_rope(x, grid, heads):
    """Rotate (even, odd) pairs by position*freq with cos/sin, per axis 44:42:42-style split."""
    B, L, C = x.shape
    d = C // heads
    f, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
    angles = []
    for axis, dim in enumerate(axis_dims(d)):
        inv = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(pos[:, axis:axis + 1].double() * inv)
    ang = torch.cat(angles, 1)  # L, d/2
    xs = x.double().view(B, L, heads, d // 2, 2)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    re = xs[..., 0] * cos - xs[..., 1] * sin
    im = xs[..., 0] * sin + xs[..., 1] * cos
    return torch.stack([re, im], -1).view(B, L, C).to(x.dtype)


def lin(m, x):
    return x @ m.weight.T + m.bias


def reference_block(blk, x, e, grid, ctx, ref_kv=None, ip_kv=None, ref_scale=1.0, ip_scale=1.0):
    heads = blk.num_heads
    mod = blk.modulation + e
    shift, scale, gate, c_shift, c_scale, c_gate = [mod[:, j:j + 1] for j in range(6)]
    n1 = ref_ln(x) * (1 + scale) + shift
    sa = blk.self_attn
    q = ref_rms(lin(sa.q, n1), sa.norm_q.weight)
    k = ref_rms(lin(sa.k, n1), sa.norm_k.weight)
    v = lin(sa.v, n1)
    a = ref_attn(ref_rope(q, grid, heads), ref_rope(k, grid, heads), v, heads)
    if ref_kv is not None:
        a = a + ref_scale * ref_attn(q, ref_kv[0], ref_kv[1], heads)
    x = x + lin(sa.o, a) * gate
    n2 = ref_ln(x, w=blk.norm3.weight, b=blk.norm3.bias)
    ca = blk.cross_attn
    q = ref_rms(lin(ca.q, n2), ca.norm_q.weight)
    k = ref_rms(lin(ca.k, ctx), ca.norm_k.weight)
    a = ref_attn(q, k, lin(ca.v, ctx), heads)
    if ip_kv is not None:
        a = a + ip_scale * ref_attn(q, ip_kv[0], ip_kv[1], heads)
    x = x + lin(ca.o, a)
    n3 = ref_ln(x) * (1 + c_scale) + c_shift
    h = lin(blk.ffn[0], n3)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return x + lin(blk.ffn[2], h) * c_gate


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    model = WanModel(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    blk = model.blocks[1]
    grid = (2, 3, 4)
    L = math.prod(grid)
    x = torch.randn(2, L, CFG.dim)
    e = torch.randn(2, 6, CFG.dim) * 0.3
    ctx = torch.randn(2, 7, CFG.dim)
    ref_kv = (torch.randn(2, 5, CFG.dim), torch.randn(2, 5, CFG.dim))
    ip_kv = (torch.randn(1, 3, CFG.dim), torch.randn(1, 3, CFG.dim))
    return blk, x, e, grid, ctx, ref_kv, ip_kv


def run(blk, x, e, grid, ctx, adapters=None, capture=None):
    freqs = rope_freqs(grid, CFG.head_dim)
    with torch.no_grad():
        return wan_block_forward(blk, x, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa,
                                 adapters=adapters, capture=capture)


def test_plain_block_matches_reference(setup):
    blk, x, e, grid, ctx, *_ = setup
    with torch.no_grad():
        want = reference_block(blk, x, e, grid, ctx)
    torch.testing.assert_close(run(blk, x, e, grid, ctx), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ref_scale,ip_scale", [(1.0, 1.0), (0.6, 1.7), (1.0, 0.0), (0.0, 1.0)])
def test_lynx_block_matches_reference(setup, ref_scale, ip_scale):
    blk, x, e, grid, ctx, ref_kv, ip_kv = setup
    ad = BlockAdapterInputs(ip=ip_kv, ref=ref_kv, ip_scale=ip_scale, ref_scale=ref_scale)
    with torch.no_grad():
        want = reference_block(blk, x, e, grid, ctx, ref_kv=ref_kv if ref_scale else None,
                               ip_kv=(ip_kv[0].expand(2, -1, -1), ip_kv[1].expand(2, -1, -1)) if ip_scale else None,
                               ref_scale=ref_scale, ip_scale=ip_scale)
    got = run(blk, x, e, grid, ctx, ad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_zero_scales_equal_plain_block(setup):
    blk, x, e, grid, ctx, ref_kv, ip_kv = setup
    ad = BlockAdapterInputs(ip=ip_kv, ref=ref_kv, ip_scale=0.0, ref_scale=0.0)
    assert torch.equal(run(blk, x, e, grid, ctx, ad), run(blk, x, e, grid, ctx))


def test_adapters_change_the_output(setup):
    blk, x, e, grid, ctx, ref_kv, ip_kv = setup
    plain = run(blk, x, e, grid, ctx)
    assert not torch.allclose(run(blk, x, e, grid, ctx, BlockAdapterInputs(ip=ip_kv)), plain)
    assert not torch.allclose(run(blk, x, e, grid, ctx, BlockAdapterInputs(ref=ref_kv)), plain)


def test_capture_is_modulated_normalised_input(setup):
    blk, x, e, grid, ctx, *_ = setup
    got = {}
    run(blk, x, e, grid, ctx, capture=lambda n1: got.setdefault("n1", n1))
    mod = blk.modulation + e
    want = ref_ln(x) * (1 + mod[:, 1:2]) + mod[:, 0:1]
    torch.testing.assert_close(got["n1"], want.detach(), rtol=1e-5, atol=1e-5)


def test_comfy_style_4d_modulation_is_accepted(setup):
    blk, x, e, grid, ctx, *_ = setup
    torch.testing.assert_close(run(blk, x, e.unsqueeze(1), grid, ctx), run(blk, x, e, grid, ctx))
