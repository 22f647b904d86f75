"""LoRA on the adapter projections: exact start, merge == LoRA forward, counts, state round trip, errors."""
from __future__ import annotations

import pytest
import torch

from lynx_core.adapters import LynxAdapters, official_state
from lynx_core.train.lora import (
    LoRAError,
    LoRALinear,
    apply_lora,
    has_lora,
    load_lora_state,
    lora_num_params,
    lora_parameters,
    lora_settings,
    lora_state,
    merge_lora,
)

TINY = dict(dim=64, num_blocks=4, resampler_dim=64, resampler_heads=4, resampler_dim_head=16, resampler_depth=2)


def _adapters(variant: str = "full", dtype=torch.float32) -> LynxAdapters:
    torch.manual_seed(0)
    return LynxAdapters.create(variant, **TINY).to(dtype)


def _kv(adapters: LynxAdapters, tokens: torch.Tensor, feats: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's keys/values through the public key_value() (identity norm for the full keys)."""
    out = []
    for b in adapters.ip_block_indices():
        out += list(adapters.ip_layer(b).key_value(tokens, lambda t: t))
    for b in adapters.ref_block_indices():
        out += list(adapters.ref_layer(b).key_value(feats, lambda t: t))
    return out


def _inputs(adapters: LynxAdapters, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 16, adapters.id_dim, generator=g).to(dtype)
    feats = torch.randn(2, 10, adapters.dim, generator=g).to(dtype)
    return tokens, feats


def _perturb(params, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_zero_init_equals_base_exactly(variant):
    adapters = _adapters(variant)
    tokens, feats = _inputs(adapters)
    before = _kv(adapters, tokens, feats)
    apply_lora(adapters, rank=4, generator=torch.Generator().manual_seed(0))
    after = _kv(adapters, tokens, feats)
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_wrapped_layers_keep_weight_and_base_frozen():
    adapters = _adapters()
    w = adapters.ip_layers["0"].to_k_ip.weight
    params = apply_lora(adapters, rank=4, generator=torch.Generator().manual_seed(0))
    wrapped = adapters.ip_layers["0"].to_k_ip
    assert isinstance(wrapped, LoRALinear)
    assert wrapped.weight is w  # shared, not copied
    assert not wrapped.weight.requires_grad and not wrapped.bias.requires_grad
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert torch.count_nonzero(wrapped.lora_B) == 0 and torch.count_nonzero(wrapped.lora_A) > 0
    # The base weights keep their official state-dict keys; LoRA adds its own.
    keys = set(adapters.state_dict())
    assert {"ip_layers.0.to_k_ip.weight", "ip_layers.0.to_k_ip.lora_A", "ref_layers.3.to_v_ref.lora_B"} <= keys


def test_parameter_counts():
    adapters = _adapters()
    rank = 4
    params = apply_lora(adapters, rank=rank, generator=torch.Generator().manual_seed(0))
    c = adapters.config
    per_ip = 2 * rank * (c.id_dim + c.dim)        # to_k_ip, to_v_ip: A [r, id_dim], B [dim, r]
    per_ref = 2 * rank * (c.dim + c.dim)          # to_k_ref, to_v_ref
    expected = len(adapters.ip_layers) * per_ip + len(adapters.ref_layers) * per_ref
    assert sum(p.numel() for p in params) == expected == 4 * 1024 + 4 * 1024
    assert len(params) == 2 * 2 * (len(adapters.ip_layers) + len(adapters.ref_layers))
    assert [id(p) for p in params] == [id(p) for p in lora_parameters(adapters)]
    assert lora_settings(adapters) == {"rank": 4, "alpha": 4.0}
    assert lora_num_params(_adapters(), rank) == expected


def test_lynx_full_rank64_count_on_meta():
    # The planning figure of reference/training.md: rank 64 on 4 projections x 40 blocks of width 5120.
    full = LynxAdapters.create("full", device="meta")
    assert lora_num_params(full, 64) == 2 * 40 * 2 * 64 * (5120 + 5120) == 104_857_600
    lite = LynxAdapters.create("lite", device="meta")
    assert lora_num_params(lite, 64) == 20 * 2 * 64 * (2048 + 5120)
    with pytest.raises(LoRAError, match="meta device"):
        apply_lora(full, rank=64)


def test_lite_has_no_ref_targets():
    adapters = _adapters("lite")
    params = apply_lora(adapters, rank=2, generator=torch.Generator().manual_seed(0))
    assert len(params) == 2 * 2 * len(adapters.ip_layers) == 8
    assert all(k.startswith("ip_layers.") for k in lora_state(adapters))


def test_merged_forward_equals_lora_forward_and_has_official_keys():
    adapters = _adapters()
    tokens, feats = _inputs(adapters)
    base_out = _kv(adapters, tokens, feats)
    params = apply_lora(adapters, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    _perturb(params)
    lora_out = _kv(adapters, tokens, feats)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(base_out, lora_out))  # the update acts
    merged = merge_lora(adapters)
    assert not has_lora(merged) and has_lora(adapters)  # the copy is plain, the original keeps training
    merged_out = _kv(merged, tokens, feats)
    for a, b in zip(lora_out, merged_out):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    # Official layout: same keys as adapters that never had a LoRA.
    plain_keys = {p: set(sd) for p, sd in official_state(_adapters()).items()}
    assert {p: set(sd) for p, sd in official_state(merged).items()} == plain_keys
    # Unchanged tensors are shared with the training adapters, not copied.
    assert merged.resampler.latents.data_ptr() == adapters.resampler.latents.data_ptr()
    # ...and the training adapters keep training: their parameters still want gradients.
    assert all(p.requires_grad for p in params) and adapters.resampler.latents.requires_grad
    assert not any(p.requires_grad for p in merged.parameters())


def test_merge_inplace_replaces_with_plain_linear():
    adapters = _adapters()
    tokens, feats = _inputs(adapters)
    _perturb(apply_lora(adapters, rank=3, generator=torch.Generator().manual_seed(0)))
    lora_out = _kv(adapters, tokens, feats)
    same = merge_lora(adapters, inplace=True)
    assert same is adapters and not has_lora(adapters)
    assert type(adapters.ref_layers["2"].to_k_ref) is torch.nn.Linear
    for a, b in zip(lora_out, _kv(adapters, tokens, feats)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_bf16_module_keeps_its_dtype_and_lora_stays_fp32():
    adapters = _adapters(dtype=torch.bfloat16)
    tokens, feats = _inputs(adapters, torch.bfloat16)
    before = _kv(adapters, tokens, feats)
    params = apply_lora(adapters, rank=4, generator=torch.Generator().manual_seed(0))
    assert all(p.dtype == torch.float32 for p in params)
    after = _kv(adapters, tokens, feats)
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(after, before))
    # Gradients reach the fp32 LoRA parameters through the bf16 module.
    k, v = adapters.ref_layer(0).key_value(feats, lambda t: t)
    (k.float().square().sum() + v.float().sum()).backward()
    wrapped = adapters.ref_layers["0"].to_k_ref
    assert wrapped.lora_B.grad is not None and wrapped.lora_B.grad.abs().sum() > 0
    assert wrapped.weight.grad is None


def test_seeded_generator_makes_a_reproducible():
    a1, a2, a3 = _adapters(), _adapters(), _adapters()
    apply_lora(a1, rank=4, generator=torch.Generator().manual_seed(7))
    apply_lora(a2, rank=4, generator=torch.Generator().manual_seed(7))
    apply_lora(a3, rank=4, generator=torch.Generator().manual_seed(8))
    s1, s2, s3 = lora_state(a1), lora_state(a2), lora_state(a3)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["ip_layers.0.to_k_ip.lora_A"], s3["ip_layers.0.to_k_ip.lora_A"])


def test_lora_state_round_trip():
    src, dst = _adapters(), _adapters()
    _perturb(apply_lora(src, rank=4, generator=torch.Generator().manual_seed(0)))
    apply_lora(dst, rank=4, generator=torch.Generator().manual_seed(99))
    load_lora_state(dst, {k: v.clone() for k, v in lora_state(src).items()})
    tokens, feats = _inputs(src)
    for a, b in zip(_kv(src, tokens, feats), _kv(dst, tokens, feats)):
        assert torch.equal(a, b)


def test_load_lora_state_with_other_rank_names_the_fix():
    src, dst = _adapters(), _adapters()
    apply_lora(src, rank=4, generator=torch.Generator().manual_seed(0))
    apply_lora(dst, rank=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(LoRAError, match="lora_rank to 4"):
        load_lora_state(dst, lora_state(src))
    state = lora_state(src)
    state.pop("ref_layers.0.to_k_ref.lora_A")
    dst2 = _adapters()
    apply_lora(dst2, rank=4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(LoRAError, match="1 missing"):
        load_lora_state(dst2, state)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, 65])
def test_rank_validation(rank):
    adapters = _adapters()
    with pytest.raises(LoRAError, match="rank"):
        apply_lora(adapters, rank=rank)
    assert not has_lora(adapters)  # a refused request leaves the adapters untouched


def test_alpha_validation_and_double_apply():
    adapters = _adapters()
    with pytest.raises(LoRAError, match="alpha"):
        apply_lora(adapters, rank=2, alpha=0.0)
    apply_lora(adapters, rank=2)
    with pytest.raises(LoRAError, match="already"):
        apply_lora(adapters, rank=2)
    with pytest.raises(LoRAError, match="apply_lora first"):
        lora_state(_adapters())
