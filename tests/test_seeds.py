"""Seeded noise: identical to diffusers' randn_tensor on a CPU generator, deterministic, validated."""
from __future__ import annotations

import pytest
import torch

from lynx_core.seeds import MAX_SEED, initial_noise, reference_noise

SHAPE = (1, 16, 3, 6, 10)


def _randn_tensor():
    pytest.importorskip("diffusers")
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor


@pytest.mark.parametrize("seed", [0, 42, 123456789])
def test_initial_noise_matches_diffusers(seed):
    randn_tensor = _randn_tensor()
    expected = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    out = initial_noise(seed, SHAPE)
    assert out.dtype == torch.float32 and out.shape == SHAPE and out.device.type == "cpu"
    assert torch.equal(out, expected)


@pytest.mark.parametrize("seed", [0, 42])
def test_reference_noise_matches_diffusers_seed_plus_one_bf16(seed):
    randn_tensor = _randn_tensor()
    shape = (1, 16, 1, 32, 32)
    expected = randn_tensor(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.bfloat16)
    out = reference_noise(seed, shape)
    assert out.dtype == torch.bfloat16 and out.shape == shape
    assert torch.equal(out, expected)
    # not just the fp32 draw cast down: it must be the seed+1 stream
    assert not torch.equal(out, initial_noise(seed, shape).to(torch.bfloat16))


def test_same_seed_same_noise_regardless_of_global_rng():
    torch.manual_seed(1)
    a = initial_noise(7, SHAPE)
    torch.manual_seed(2)
    torch.randn(100)
    b = initial_noise(7, SHAPE)
    assert torch.equal(a, b)
    assert torch.equal(reference_noise(7, SHAPE), reference_noise(7, SHAPE))


def test_different_seeds_differ():
    assert not torch.equal(initial_noise(7, SHAPE), initial_noise(8, SHAPE))
    assert not torch.equal(reference_noise(7, SHAPE), reference_noise(8, SHAPE))


def test_noise_statistics():
    x = initial_noise(3, (1, 16, 21, 30, 52))
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1.0) < 0.01


def test_device_argument():
    out = initial_noise(5, (2, 3), device="cpu")
    assert torch.equal(out, initial_noise(5, (2, 3)))


@pytest.mark.parametrize("seed", [-1, -42])
def test_negative_seed_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        initial_noise(seed, SHAPE)
    with pytest.raises(ValueError, match="seed"):
        reference_noise(seed, SHAPE)


@pytest.mark.parametrize("seed", [1.5, "3", None])
def test_non_integer_seed_rejected(seed):
    with pytest.raises(TypeError, match="seed"):
        initial_noise(seed, SHAPE)


def test_seed_range():
    with pytest.raises(ValueError, match="2\\^64"):
        initial_noise(MAX_SEED + 1, (2,))
    initial_noise(MAX_SEED, (2,))
    # the largest seed's +1 wraps to 0 rather than failing
    assert torch.equal(reference_noise(MAX_SEED, (4,)), torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16))


def test_bad_shape_rejected():
    with pytest.raises(ValueError, match="shape"):
        initial_noise(0, (2, -1))
