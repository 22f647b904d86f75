"""The diffusers Wan VAE bridge: reference latent = posterior sample with seed+1 bf16 noise, normalised."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra")

from lynx_core.extras.diffusers_io import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE
from lynx_core.seeds import reference_noise


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(folder)
    return WanVAE(folder, dtype=torch.float32)


def test_reference_latent_is_the_seeded_posterior_sample(vae):
    crop = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    z = vae.encode_reference(crop, seed=42)
    assert z.shape == (1, 16, 1, 32, 32)
    x = torch.from_numpy(crop).float().div(255).mul(2).sub(1).permute(2, 0, 1)[None, :, None]
    dist = vae.vae.encode(x).latent_dist
    noise = reference_noise(42, (1, 16, 1, 32, 32)).float()
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    want = (dist.mean + dist.std * noise - mean) / std
    torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(z, vae.encode_reference(crop, seed=42))
    assert not torch.allclose(z, vae.encode_reference(crop, seed=43))


def test_grey_reference_uses_same_noise_and_ignores_the_face(vae):
    a = np.zeros((256, 256, 3), np.uint8)
    b = np.full((256, 256, 3), 255, np.uint8)
    torch.testing.assert_close(vae.encode_reference(a, 5, grey=True), vae.encode_reference(b, 5, grey=True))


def test_decode_gives_uint8_frames(vae):
    frames = vae.decode(torch.randn(1, 16, 3, 4, 6))
    assert frames.dtype == np.uint8 and frames.shape == (9, 32, 48, 3)
