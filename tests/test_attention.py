"""Attention dispatch: SDPA matches plain softmax attention; backend selection and errors."""
import math

import pytest
import torch

from lynx_core import attention as A


def naive(q, k, v, heads):
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), -1)
    return (w @ vh).transpose(1, 2).reshape(b, lq, c)


def test_sdpa_matches_naive_with_different_kv_length():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 7, 32, generator=g), torch.randn(2, 11, 32, generator=g), torch.randn(2, 11, 32, generator=g)
    torch.testing.assert_close(A.attention_sdpa(q, k, v, 4), naive(q, k, v, 4), rtol=1e-5, atol=1e-5)


def test_auto_uses_sdpa_on_cpu_even_when_kernels_are_installed(monkeypatch):
    monkeypatch.delenv("LYNX_ATTENTION", raising=False)
    assert A.get_attention() is A.attention_auto
    called = []
    monkeypatch.setattr(A, "_flash_fn", lambda: (lambda *a, **k: called.append(1)))
    q = torch.randn(1, 5, 16)
    torch.testing.assert_close(A.attention_auto(q, q, q, 2), A.attention_sdpa(q, q, q, 2))
    assert not called


def test_env_override_and_unknown_backend(monkeypatch):
    monkeypatch.setenv("LYNX_ATTENTION", "sdpa")
    assert A.get_attention(None) is A.attention_sdpa
    with pytest.raises(ValueError, match="unknown attention backend 'xformerz'"):
        A.get_attention("xformerz")


def test_missing_optional_backend_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(A, "_flash_fn", lambda: None)
    q = torch.randn(1, 4, 16)
    with pytest.raises(RuntimeError, match="install flash-attn or use 'sdpa'"):
        A.attention_flash(q, q, q, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash-attn / SageAttention)")
@pytest.mark.parametrize("name", ["flash", "sage"])
def test_cuda_backends_agree_with_sdpa_in_bf16(name):
    if name not in A.available_backends("cuda"):
        pytest.skip(f"{name} not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 256, 5120, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    ref = A.attention_sdpa(q, k, v, 40).float()
    got = A.get_attention(name)(q, k, v, 40).float()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
