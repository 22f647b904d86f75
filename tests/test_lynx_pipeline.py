"""Standalone Lynx sampling: seeds, adapter K/V caching, the reference pass, lite mapping, window."""
import pytest
import torch

from lynx_core.adapters import LynxAdapters
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.pipeline import GenerationSettings, generate, latent_shape
from lynx_core.reference import extract_reference_features
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel

CFG = WAN_CONFIGS["tiny"]
SHAPE = (1, 16, 2, 4, 6)
SMALL = dict(id_dim=CFG.dim, resampler_dim=32, resampler_heads=2, resampler_dim_head=16,
             resampler_depth=2)


def _perturb(module, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    model = WanModel(CFG).eval().requires_grad_(False)
    _perturb(model, 1)
    full = LynxAdapters.create("full", dim=CFG.dim, num_blocks=CFG.num_layers, n_registers=4, **SMALL).eval()
    _perturb(full, 2)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 6, CFG.text_dim, generator=g)
    negative = torch.randn(1, 6, CFG.text_dim, generator=g)
    ref_ctx = torch.randn(1, 4, CFG.text_dim, generator=g)
    face_latent = torch.randn(1, 16, 1, 8, 8, generator=g)
    emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    ref_c = extract_reference_features(model, face_latent, ref_ctx)
    ref_u = extract_reference_features(model, torch.zeros_like(face_latent), ref_ctx)
    return model, full, prompt, negative, emb, ref_c, ref_u


def _settings(**kw):
    base = dict(seed=7, steps=4, sampler="euler")
    base.update(kw)
    return GenerationSettings(**base)


def test_reference_features_shape(parts):
    model, _, _, _, _, ref_c, ref_u = parts
    assert sorted(ref_c) == list(range(CFG.num_layers))
    assert all(v.shape == (1, 64 // 4, CFG.dim) for v in ref_c.values())
    assert not torch.allclose(ref_c[0], ref_u[0])


def test_same_seed_same_latents_different_seed_differs(parts):
    model, full, prompt, negative, emb, ref_c, ref_u = parts
    patch = LynxPatch(full, make_conditioning(full, emb, ref_c, ref_u))
    a = generate(model, prompt, negative, SHAPE, _settings(), patch)
    b = generate(model, prompt, negative, SHAPE, _settings(), patch)
    c = generate(model, prompt, negative, SHAPE, _settings(seed=8), patch)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


class RecomputingPatch(LynxPatch):
    """Drops the K/V cache before every block: the output must not change."""
    def block_inputs(self, *args, **kwargs):
        self.cache.clear()
        return super().block_inputs(*args, **kwargs)


def test_cached_adapter_kv_equals_recomputing(parts):
    model, full, prompt, negative, emb, ref_c, ref_u = parts
    cond = make_conditioning(full, emb, ref_c, ref_u)
    cached = LynxPatch(full, cond)
    a = generate(model, prompt, negative, SHAPE, _settings(sampler="unipc"), cached)
    b = generate(model, prompt, negative, SHAPE, _settings(sampler="unipc"), RecomputingPatch(full, cond))
    assert torch.equal(a, b)
    # one entry per (block, identity), filled once for the whole run
    assert len(cached.cache._ip) == 2 * CFG.num_layers
    assert len(cached.cache._ref) == 2 * CFG.num_layers


def test_identity_and_reference_change_the_video(parts):
    model, full, prompt, negative, emb, ref_c, ref_u = parts
    base = generate(model, prompt, negative, SHAPE, _settings(), None)
    with_face = generate(model, prompt, negative, SHAPE, _settings(),
                         LynxPatch(full, make_conditioning(full, emb, ref_c, ref_u)))
    no_scales = generate(model, prompt, negative, SHAPE, _settings(),
                         LynxPatch(full, make_conditioning(full, emb, ref_c, ref_u), ip_scale=0, ref_scale=0))
    assert not torch.allclose(base, with_face)
    assert torch.equal(base, no_scales)


def test_window_outside_means_plain_model(parts):
    model, full, prompt, negative, emb, ref_c, ref_u = parts
    base = generate(model, prompt, negative, SHAPE, _settings(), None)
    never = generate(model, prompt, negative, SHAPE, _settings(start_percent=0.5, end_percent=0.5),
                     LynxPatch(full, make_conditioning(full, emb, ref_c, ref_u)))
    half = generate(model, prompt, negative, SHAPE, _settings(start_percent=0.0, end_percent=0.5),
                    LynxPatch(full, make_conditioning(full, emb, ref_c, ref_u)))
    assert torch.equal(base, never)
    assert not torch.allclose(base, half)


def test_lite_adapters_sit_on_every_second_block(parts):
    model, *_ , emb, _, _ = parts
    lite = LynxAdapters.create("lite", dim=CFG.dim, num_blocks=CFG.num_layers, **{**SMALL, "id_dim": 24}).eval()
    _perturb(lite, 5)
    patch = LynxPatch(lite, make_conditioning(lite, emb))
    blocks = model.blocks
    x_dev, dtype = torch.device("cpu"), torch.float32
    got = {i: patch.block_inputs(i, blocks[i], [COND, UNCOND], x_dev, dtype) for i in range(CFG.num_layers)}
    assert [i for i, v in got.items() if v is not None] == list(range(0, CFG.num_layers, 2))
    k, v = got[0].ip
    assert k.shape == (2, 16, CFG.dim) and got[0].ref is None
    assert not torch.allclose(k[0], k[1])  # face vs no-identity rows differ


def test_latent_shape_rules():
    assert latent_shape(81, 480, 832) == (1, 16, 21, 60, 104)
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_shape(80, 480, 832)
