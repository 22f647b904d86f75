"""Perceiver Resampler: official key schema, parameter counts, and the spec's formulas."""
from __future__ import annotations

import math

import pytest
import torch

from lynx_core.adapters import LynxAdapters, Resampler

TINY = dict(dim=64, depth=3, dim_head=16, heads=4, num_queries=16, embedding_dim=32, output_dim=48, ff_mult=4)


def reference_resampler(sd, emb, heads, *, gelu="erf", kv_with_x=True, eps=1e-5):
    """Spec section 3 written out in float64 from the state dict, independently of the module."""
    p = {k: v.detach().double() for k, v in sd.items()}

    def layer_norm(t, name):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]

    def act(t):
        if gelu == "erf":
            return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))
        return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t**3)))

    b = emb.shape[0]
    x = emb.double().reshape(b, 1, -1) @ p["proj_in.weight"].T + p["proj_in.bias"]
    lat = p["latents"].expand(b, -1, -1)
    depth = len({k.split(".")[1] for k in p if k.startswith("layers.")})
    for i in range(depth):
        a = f"layers.{i}.0"
        xn, ln = layer_norm(x, f"{a}.norm1"), layer_norm(lat, f"{a}.norm2")
        q = ln @ p[f"{a}.to_q.weight"].T
        kv_in = torch.cat([xn, ln], dim=1) if kv_with_x else ln
        kv = kv_in @ p[f"{a}.to_kv.weight"].T
        inner = q.shape[-1]
        k, v = kv[..., :inner], kv[..., inner:]
        d = inner // heads

        def split(t):
            return t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3)

        q, k, v = split(q), split(k), split(v)
        s = d ** -0.25
        w = torch.softmax((q * s) @ (k * s).transpose(-1, -2), dim=-1)
        o = (w @ v).permute(0, 2, 1, 3).reshape(b, -1, inner) @ p[f"{a}.to_out.weight"].T
        lat = o + lat
        f = f"layers.{i}.1"
        h = act(layer_norm(lat, f"{f}.0") @ p[f"{f}.1.weight"].T) @ p[f"{f}.3.weight"].T
        lat = h + lat
    out = lat @ p["proj_out.weight"].T + p["proj_out.bias"]
    return layer_norm(out, "norm_out")


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    # LayerNorm weights start at 1/0; random affine values make the test see every parameter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))


def test_official_key_schema_and_shapes():
    sd = Resampler(device="meta").state_dict()
    expected = {
        "latents": (1, 16, 1280),
        "proj_in.weight": (1280, 512),
        "proj_in.bias": (1280,),
        "proj_out.weight": (5120, 1280),
        "proj_out.bias": (5120,),
        "norm_out.weight": (5120,),
        "norm_out.bias": (5120,),
    }
    for i in range(4):
        for n in ("norm1", "norm2"):
            expected[f"layers.{i}.0.{n}.weight"] = (1280,)
            expected[f"layers.{i}.0.{n}.bias"] = (1280,)
        expected[f"layers.{i}.0.to_q.weight"] = (1280, 1280)
        expected[f"layers.{i}.0.to_kv.weight"] = (2560, 1280)
        expected[f"layers.{i}.0.to_out.weight"] = (1280, 1280)
        expected[f"layers.{i}.1.0.weight"] = (1280,)
        expected[f"layers.{i}.1.0.bias"] = (1280,)
        expected[f"layers.{i}.1.1.weight"] = (5120, 1280)
        expected[f"layers.{i}.1.3.weight"] = (1280, 5120)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


@pytest.mark.parametrize("variant,count", [("full", 85_920_000), ("lite", 81_978_624)])
def test_parameter_counts_match_spec(variant, count):
    adapters = LynxAdapters.create(variant, device="meta")
    assert adapters.num_params("resampler") == count


def test_layer_norms_use_eps_1e5_and_gelu_is_exact():
    r = Resampler(**TINY, device="meta")
    norms = [m for m in r.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 * TINY["depth"] + 1
    assert all(m.eps == 1e-5 for m in norms)
    gelus = [m for m in r.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == TINY["depth"] and all(m.approximate == "none" for m in gelus)


def test_forward_matches_reference_fp32():
    torch.manual_seed(0)
    r = Resampler(**TINY)
    _randomize(r)
    emb = torch.randn(3, TINY["embedding_dim"])
    out = r(emb.unsqueeze(1))
    assert out.shape == (3, TINY["num_queries"], TINY["output_dim"])
    ref = reference_resampler(r.state_dict(), emb, TINY["heads"])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=3e-5)
    # Controls: the comparison is sharp enough to see a tanh GELU, another LayerNorm eps, or
    # keys/values made from the latents alone.
    for kwargs in ({"gelu": "tanh"}, {"eps": 1e-6}, {"kv_with_x": False}):
        wrong = reference_resampler(r.state_dict(), emb, TINY["heads"], **kwargs)
        assert (wrong - out.double()).abs().max() > 3e-4


def test_2d_and_3d_inputs_agree_and_bad_shapes_fail():
    torch.manual_seed(1)
    r = Resampler(**TINY)
    emb = torch.randn(2, TINY["embedding_dim"])
    torch.testing.assert_close(r(emb), r(emb[:, None]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ArcFace"):
        r(torch.randn(2, TINY["embedding_dim"] + 1))


def test_bf16_uses_fp32_softmax_and_stays_close(monkeypatch):
    torch.manual_seed(2)
    r = Resampler(**TINY)
    _randomize(r, seed=3)
    r = r.to(torch.bfloat16)
    seen = []
    real_softmax = torch.softmax

    def spy(t, *args, **kwargs):
        seen.append(t.dtype)
        return real_softmax(t, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", spy)
    emb = torch.randn(2, TINY["embedding_dim"])
    out = r(emb)
    monkeypatch.undo()
    assert out.dtype == torch.bfloat16
    assert seen and all(d == torch.float32 for d in seen)
    ref = reference_resampler(r.state_dict(), emb.bfloat16().float(), TINY["heads"])
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 2e-2


def test_attention_pre_scales_q_and_k_by_quarter_power_in_bf16():
    # The official head width 64 (64^-1/4 is not a power of two, so the two orders round apart).
    cfg = dict(TINY, dim=128, heads=2, dim_head=64)
    torch.manual_seed(4)
    r = Resampler(**cfg).to(torch.bfloat16)
    attn = r.layers[0][0]
    x = torch.randn(2, 1, cfg["dim"]).bfloat16()
    lat = torch.randn(2, 16, cfg["dim"]).bfloat16()
    out = attn(x, lat)

    xn, ln = attn.norm1(x), attn.norm2(lat)
    q = attn.to_q(ln)
    k, v = attn.to_kv(torch.cat([xn, ln], 1)).chunk(2, -1)
    h, d = cfg["heads"], cfg["dim_head"]
    q, k, v = (t.view(2, -1, h, d).transpose(1, 2) for t in (q, k, v))

    def finish(logits):
        w = torch.softmax(logits.float(), -1).to(logits.dtype)
        return attn.to_out((w @ v).transpose(1, 2).reshape(2, 16, -1))

    s = d ** -0.25
    pre_scaled = finish((q * s) @ (k * s).transpose(-1, -2))
    post_scaled = finish((q @ k.transpose(-1, -2)) / math.sqrt(d))
    assert torch.equal(out, pre_scaled)
    assert not torch.equal(out, post_scaled)  # bf16 rounding tells the two orders apart


def test_uncond_tokens_are_resampler_of_zeros_not_zeros():
    torch.manual_seed(5)
    a = LynxAdapters.create("full", dim=64, num_blocks=2, resampler_dim=64, resampler_heads=4,
                            resampler_dim_head=16, embedding_dim=32)
    uncond = a.encode_identity(None, batch=2)
    assert uncond.shape == (2, 16, 64)
    torch.testing.assert_close(uncond, a.resampler(torch.zeros(2, 32)), rtol=0, atol=0)
    assert uncond.abs().max() > 0.1
