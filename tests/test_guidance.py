"""Guidance formulas, their bf16 operation order, the mode choice and the adapter window."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lynx_core.guidance import (
    adapter_window_active,
    adapter_window_active_sigma,
    combine_three_pass,
    combine_two_pass,
    guidance_mode,
    validate_window,
)


def _passes(dtype=torch.float32, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, generator=g).to(dtype) for _ in range(3)]


def _plain_three_pass(u, i, c, g, gi):
    """Element by element in float64, no tensors."""
    out = np.empty(u.size)
    for k, (a, b, d) in enumerate(zip(u.ravel(), i.ravel(), c.ravel())):
        out[k] = a + gi * (b - a) + g * (d - b)
    return out.reshape(u.shape)


@pytest.mark.parametrize("cfg,cfg_id", [(5.0, 2.0), (7.5, 1.5), (3.0, 4.0)])
def test_three_pass_matches_plain_reference(cfg, cfg_id):
    u, i, c = _passes(n=256)
    out = combine_three_pass(u, i, c, cfg, cfg_id)
    assert out.dtype == torch.float32 and out.shape == u.shape
    ref = _plain_three_pass(*(t.double().numpy() for t in (u, i, c)), cfg, cfg_id)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_two_pass_matches_plain_reference():
    u, _, c = _passes(n=256)
    out = combine_two_pass(u, c, 5.0)
    ref = [a + 5.0 * (b - a) for a, b in zip(u.double().ravel().tolist(), c.double().ravel().tolist())]
    np.testing.assert_allclose(out.double().ravel().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_three_pass_algebraic_identity_fp32():
    u, i, c = _passes()
    g, gi = 5.0, 2.0
    expanded = (1 - gi) * u + (gi - g) * i + g * c
    torch.testing.assert_close(combine_three_pass(u, i, c, g, gi), expanded, rtol=1e-5, atol=1e-5)
    # With the defaults that is −u − 3i + 5c.
    torch.testing.assert_close(combine_three_pass(u, i, c, g, gi), -u - 3 * i + 5 * c, rtol=1e-5, atol=1e-5)


def test_three_pass_reduces_to_two_pass_when_i_equals_u():
    u, _, c = _passes()
    torch.testing.assert_close(combine_three_pass(u, u, c, 5.0, 2.0), combine_two_pass(u, c, 5.0))


def _round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def test_three_pass_bf16_uses_official_operation_order():
    u, i, c = _passes(torch.bfloat16, n=50_000)
    g, gi = 5.0, 2.0
    out = combine_three_pass(u, i, c, g, gi)
    assert out.dtype == torch.bfloat16
    # Emulate bf16 arithmetic in fp32 with one rounding after every operation, in the order
    # u + gi·(i − u) + g·(c − i).
    U, I, C = u.float(), i.float(), c.float()
    emulated = _round_bf16(_round_bf16(U + _round_bf16(gi * _round_bf16(I - U))) + _round_bf16(g * _round_bf16(C - I)))
    assert torch.equal(out.float(), emulated)
    # The expanded form is the same number in exact arithmetic but not in bf16.
    expanded = (1 - gi) * u + (gi - g) * i + g * c
    assert expanded.dtype == torch.bfloat16
    assert not torch.equal(out, expanded)


def test_guidance_rejects_mismatched_inputs():
    u, i, c = _passes()
    with pytest.raises(ValueError, match="dtype"):
        combine_three_pass(u, i.to(torch.bfloat16), c, 5.0, 2.0)
    with pytest.raises(ValueError, match="shape"):
        combine_two_pass(u, c[:1], 5.0)
    with pytest.raises(ValueError, match="finite"):
        combine_two_pass(u, c, float("nan"))


@pytest.mark.parametrize(
    "cfg,cfg_id,mode",
    [
        (5.0, 2.0, "three_pass"),
        (5.0, 1.0001, "three_pass"),
        (5.0, 1.0, "two_pass"),
        (5.0, 0.0, "two_pass"),
        (1.0001, 2.0, "three_pass"),
        (1.0, 2.0, "none"),
        (1.0, 1.0, "none"),
        (0.5, 0.0, "none"),
    ],
)
def test_guidance_mode(cfg, cfg_id, mode):
    assert guidance_mode(cfg, cfg_id) == mode


# --------------------------------------------------------------------------------------------
# adapter window
# --------------------------------------------------------------------------------------------


def _active_steps(n, start, end):
    return [k for k in range(n) if adapter_window_active(k, n, start, end)]


def test_window_full_range_is_every_step():
    assert _active_steps(50, 0.0, 1.0) == list(range(50))
    assert _active_steps(1, 0.0, 1.0) == [0]


def test_window_end_one_includes_last_step():
    assert _active_steps(50, 0.5, 1.0) == list(range(25, 50))
    assert adapter_window_active(49, 50, 0.9, 1.0)


def test_window_half_open():
    # progress 10/50 = 0.2 is included at the start and excluded at the end
    assert _active_steps(50, 0.2, 0.4) == list(range(10, 20))
    assert _active_steps(4, 0.0, 0.5) == [0, 1]


def test_window_start_equals_end_is_never():
    for p in (0.0, 0.3, 0.5, 1.0):
        assert _active_steps(50, p, p) == []


@pytest.mark.parametrize("start,end", [(-0.1, 1.0), (0.0, 1.1), (0.6, 0.4), (float("nan"), 1.0)])
def test_window_validation(start, end):
    with pytest.raises(ValueError):
        adapter_window_active(0, 10, start, end)
    with pytest.raises(ValueError):
        validate_window(start, end)


@pytest.mark.parametrize("k,n", [(-1, 10), (10, 10), (0, 0), (1.5, 10)])
def test_window_step_validation(k, n):
    with pytest.raises(ValueError):
        adapter_window_active(k, n, 0.0, 1.0)


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.25, 0.75), (0.5, 1.0), (0.0, 0.125), (0.375, 0.375)])
def test_sigma_window_agrees_with_step_window(start, end):
    """With σ = 1 − progress (exact in binary for n = 8) both rules pick the same steps."""
    n = 8
    by_sigma = [k for k in range(n) if adapter_window_active_sigma(1 - k / n, 1 - start, 1 - end)]
    assert by_sigma == _active_steps(n, start, end)


def test_sigma_window_comfy_style_bounds():
    # ComfyUI maps start 0 to a huge sigma and end 1 to sigma 0.
    assert adapter_window_active_sigma(1.0, 999999999.9, 0.0)
    assert adapter_window_active_sigma(0.01, 999999999.9, 0.0)
    assert not adapter_window_active_sigma(0.0, 999999999.9, 0.0)
    with pytest.raises(ValueError, match="sigma_start"):
        adapter_window_active_sigma(0.5, 0.2, 0.8)
