"""ID-/Ref-adapter layers and the LynxAdapters container (sizes from the spec, maths from its formulas)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lynx_core.adapters import (
    IPAdapterLayer,
    LynxAdapterError,
    LynxAdapters,
    RefAdapterLayer,
    RMSNormNoAffine,
    official_state,
)

TINY = dict(dim=64, num_blocks=4, resampler_dim=64, resampler_heads=4, resampler_dim_head=16)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


class _Recorder:
    """A block norm_k stand-in (affine RMSNorm, eps 1e-6) that counts its calls."""

    def __init__(self, dim: int):
        self.norm = torch.nn.RMSNorm(dim, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
        self.calls = 0

    def __call__(self, t):
        self.calls += 1
        return self.norm(t)


def _never(_t):
    raise AssertionError("the block norm must not be used here")


# ------------------------------------------------------------------------- RMSNormNoAffine
def test_rmsnorm_no_affine_formula_dtype_and_no_params():
    norm = RMSNormNoAffine()
    assert norm.eps == 1e-5 and list(norm.parameters()) == []
    x = torch.randn(2, 5, 64).bfloat16() * 3
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _rms(x, 1e-5).bfloat16(), rtol=0, atol=0)


def test_rmsnorm_variance_in_fp32_survives_fp16_overflow():
    # x^2 of 1000 overflows fp16 (max 65504); a variance computed in fp16 would give zeros.
    x = torch.full((1, 3, 16), 1000.0).half()
    x[..., ::2] = -1000.0
    y = RMSNormNoAffine()(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float().abs(), torch.ones(1, 3, 16), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------- IP layer
def test_full_ip_layer_appends_registers_after_tokens_and_uses_block_norm():
    torch.manual_seed(0)
    layer = IPAdapterLayer(dim=64, id_dim=48, bias=True, n_registers=16)
    assert layer.registers.shape == (1, 16, 48)
    assert layer.to_k_ip.bias is not None
    norm = _Recorder(64)
    tokens = torch.randn(2, 16, 48)
    k, v = layer.key_value(tokens, norm)
    assert norm.calls == 1
    assert k.shape == v.shape == (2, 32, 64)
    full = torch.cat([tokens, layer.registers.expand(2, -1, -1)], 1)
    torch.testing.assert_close(k, norm.norm(layer.to_k_ip(full)))
    torch.testing.assert_close(v, layer.to_v_ip(full))
    # Registers come after the face tokens and are the same for every sample.
    torch.testing.assert_close(v[0, 16:], v[1, 16:])
    torch.testing.assert_close(v[:, :16], layer.to_v_ip(tokens))
    with pytest.raises(ValueError, match="norm_k"):
        layer.key_value(tokens, None)


def test_lite_ip_layer_uses_own_param_free_norm_no_bias_no_registers():
    torch.manual_seed(1)
    layer = IPAdapterLayer(dim=64, id_dim=32, bias=False, n_registers=0, own_key_norm=True)
    assert set(layer.state_dict()) == {"to_k_ip.weight", "to_v_ip.weight"}
    tokens = torch.randn(2, 16, 32)
    k, v = layer.key_value(tokens, _never)
    assert k.shape == v.shape == (2, 16, 64)
    torch.testing.assert_close(k.double(), _rms(tokens @ layer.to_k_ip.weight.T, 1e-5))
    torch.testing.assert_close(v, tokens @ layer.to_v_ip.weight.T)
    with pytest.raises(ValueError, match=r"\[B, N, 32\]"):
        layer.key_value(torch.randn(2, 16, 64), _never)


def test_ref_layer_key_value():
    torch.manual_seed(2)
    layer = RefAdapterLayer(64)
    norm = _Recorder(64)
    f = torch.randn(1, 256, 64)
    k, v = layer.key_value(f, norm)
    assert norm.calls == 1
    torch.testing.assert_close(k, norm.norm(f @ layer.to_k_ref.weight.T + layer.to_k_ref.bias))
    torch.testing.assert_close(v, f @ layer.to_v_ref.weight.T + layer.to_v_ref.bias)


# ------------------------------------------------------------------------- sizes from the spec
def test_full_sizes_match_spec():
    a = LynxAdapters.create("full", device="meta")
    assert a.ip_block_indices() == list(range(40)) and a.ref_block_indices() == list(range(40))
    assert a.id_dim == 5120 and a.n_registers == 16
    per_ip_block = sum(p.numel() for p in a.ip_layers["7"].parameters())
    assert per_ip_block == 52_520_960  # spec 1.3, registers included
    assert a.num_params("ip_layers") == 2_100_838_400
    assert a.num_params("ref_layers") == 2_097_561_600
    assert a.num_params() == 85_920_000 + 2_100_838_400 + 2_097_561_600  # "about 4.3 B"


def test_lite_sizes_match_spec():
    a = LynxAdapters.create("lite", device="meta")
    assert a.ip_block_indices() == list(range(0, 40, 2))
    assert a.ref_layers is None and not a.has_ref
    assert a.id_dim == 2048 and a.n_registers == 0
    assert a.num_params("ip_layers") == 419_430_400
    assert a.num_params() == 81_978_624 + 419_430_400


def test_official_file_schema_on_meta():
    full = official_state(LynxAdapters.create("full", device="meta"))
    assert set(full) == {"resampler", "ip_layers", "ref_layers"}
    ip = {k: tuple(v.shape) for k, v in full["ip_layers"].items()}
    want = {}
    for i in range(40):
        want |= {f"{i}.to_k_ip.weight": (5120, 5120), f"{i}.to_k_ip.bias": (5120,),
                 f"{i}.to_v_ip.weight": (5120, 5120), f"{i}.to_v_ip.bias": (5120,),
                 f"{i}.registers": (1, 16, 5120)}
    assert ip == want
    ref = {k: tuple(v.shape) for k, v in full["ref_layers"].items()}
    assert ref == {f"{i}.{n}.{w}": ((5120, 5120) if w == "weight" else (5120,))
                   for i in range(40) for n in ("to_k_ref", "to_v_ref") for w in ("weight", "bias")}
    lite = official_state(LynxAdapters.create("lite", device="meta"))
    assert set(lite) == {"resampler", "ip_layers"}
    assert {k: tuple(v.shape) for k, v in lite["ip_layers"].items()} == {
        f"{i}.{n}.weight": (5120, 2048) for i in range(20) for n in ("to_k_ip", "to_v_ip")
    }
    assert tuple(lite["resampler"]["proj_out.weight"].shape) == (2048, 1280)


def test_random_init_scales_follow_official_code():
    torch.manual_seed(3)
    a = LynxAdapters.create("full", dim=256, num_blocks=1, resampler_dim=400, resampler_heads=4,
                            resampler_dim_head=100, resampler_depth=1)
    regs = a.ip_layers["0"].registers
    assert abs(regs.std().item() * 16 - 1) < 0.1  # randn / sqrt(256)
    assert abs(a.resampler.latents.std().item() * 20 - 1) < 0.1  # randn / sqrt(400)


# ------------------------------------------------------------------------- container behaviour
def test_tiny_sizes_build_and_run():
    torch.manual_seed(4)
    a = LynxAdapters.create("lite", id_dim=32, **TINY)
    assert a.ip_block_indices() == [0, 2] and a.ip_layer(1) is None and a.ref_layer(0) is None
    tokens = a.encode_identity(torch.randn(512))
    assert tokens.shape == (1, 16, 32)
    k, v = a.ip_layer(2).key_value(tokens, _never)
    assert k.shape == (1, 16, 64)
    mixed = LynxAdapters.create("lite", id_dim=32, with_ref=True, **TINY)
    assert mixed.ref_block_indices() == [0, 1, 2, 3]


def test_encode_identity_inputs():
    torch.manual_seed(5)
    a = LynxAdapters.create("full", **TINY)
    emb = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    one = a.encode_identity(emb)
    assert one.shape == (1, 16, 64)
    torch.testing.assert_close(a.encode_identity(torch.from_numpy(emb)[None, None]), one)
    two = a.encode_identity(torch.from_numpy(emb), batch=2)
    torch.testing.assert_close(two[1], one[0])
    assert not torch.allclose(one, a.encode_identity(None))
    with pytest.raises(LynxAdapterError, match="512-d ArcFace"):
        a.encode_identity(torch.randn(768))


def test_check_fits():
    a = LynxAdapters.create("full", device="meta")
    a.check_fits(5120, 40)
    with pytest.raises(LynxAdapterError) as err:
        a.check_fits(1536, 30, model_name="MODEL")
    msg = str(err.value)
    for part in ("5120-wide 40-block", "Wan 14B", "MODEL is 1536-wide with 30 blocks", "Wan 1.3B",
                 "Wan2.1-T2V-14B"):
        assert part in msg
    with pytest.raises(LynxAdapterError, match="5120-wide with 30 blocks"):
        a.check_fits(5120, 30)


def test_unknown_variant_is_rejected():
    with pytest.raises(LynxAdapterError, match="full"):
        LynxAdapters.create("medium", device="meta")
