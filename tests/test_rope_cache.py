"""RoPE tables are cached per (grid, device, dtype): a hit returns the same tensor, equal to a fresh
build, and the model's passes stop rebuilding them."""
from __future__ import annotations

import pytest
import torch

from lynx_core.wan import rope
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import clear_rope_cache, rope_cache_size, rope_freqs


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_rope_cache()
    yield
    clear_rope_cache()


def _uncached(grid, head_dim, dtype=torch.float64):
    # The reference construction: per-axis float64 tables, concatenated in f, h, w order.
    f, h, w = grid
    dt, dh, dw = rope.axis_dims(head_dim)

    def axis(n, d):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)

    tf, th, tw = axis(f, dt), axis(h, dh), axis(w, dw)
    table = torch.cat([tf.view(f, 1, 1, -1).expand(f, h, w, -1), th.view(1, h, 1, -1).expand(f, h, w, -1),
                       tw.view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, -1)
    return table.to(torch.complex128 if dtype == torch.float64 else torch.complex64)


def test_hit_returns_the_same_table_and_equals_a_fresh_build():
    a = rope_freqs((3, 4, 5), 16)
    b = rope_freqs((3, 4, 5), 16, device="cpu")
    assert a is b and rope_cache_size() == 1
    assert a.dtype == torch.complex128 and a.shape == (60, 8)
    assert torch.equal(a, _uncached((3, 4, 5), 16))
    f32 = rope_freqs((3, 4, 5), 16, dtype=torch.float32)
    assert f32 is not a and rope_cache_size() == 2
    assert torch.equal(f32, _uncached((3, 4, 5), 16, torch.float32))
    other = rope_freqs((3, 4, 6), 16)
    assert other.shape == (72, 8) and rope_cache_size() == 3
    assert torch.equal(other, _uncached((3, 4, 6), 16))


def test_cache_is_bounded_and_keeps_the_recent_grids():
    first = rope_freqs((1, 1, 1), 16)
    for w in range(2, 2 + rope._CACHE_SIZE):
        rope_freqs((1, 1, w), 16)
        rope_freqs((1, 1, 1), 16)  # used again: stays
    assert rope_cache_size() == rope._CACHE_SIZE
    assert rope_freqs((1, 1, 1), 16) is first
    assert rope_freqs((1, 1, 2), 16) is not None and rope_cache_size() == rope._CACHE_SIZE


def test_model_passes_share_one_table(monkeypatch):
    built = []
    real = rope._host_table
    monkeypatch.setattr(rope, "_host_table", lambda *a: built.append(a) or real(*a))
    model = WanModel(WAN_CONFIGS["tiny"]).eval()
    x = torch.randn(1, 16, 2, 8, 8)
    ctx = torch.randn(1, 5, model.config.text_dim)
    with torch.no_grad():
        out = [model(x, torch.tensor([500.0]), ctx) for _ in range(3)]
    assert len(built) == 1
    assert torch.equal(out[0], out[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_table_is_cached_on_the_device_and_equals_the_host_one():
    host = rope_freqs((2, 3, 4), 128)
    dev = rope_freqs((2, 3, 4), 128, device="cuda")
    assert dev.device.type == "cuda" and rope_freqs((2, 3, 4), 128, device="cuda:0") is dev
    assert torch.equal(dev.cpu(), host)
