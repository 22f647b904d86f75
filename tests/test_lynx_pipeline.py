"""Standalone Lynx sampling: seeds, adapter K/V caching, the reference pass, lite mapping, window."""
from contextlib import contextmanager

import pytest
import torch

from lynx_core.adapters import LynxAdapters
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.pipeline import GenerationSettings, generate, latent_shape
from tests.tiny_lynx import CFG, SHAPE, perturb as _perturb, small_resampler, tiny_lynx

SMALL = small_resampler()


@pytest.fixture(scope="module")
def parts():
    t = tiny_lynx()
    return t.model, t.adapters, t.prompt, t.negative, t.emb, t.ref_cond, t.ref_uncond


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


def _kv_entries(patch):
    return {**{("ip",) + k: v for k, v in patch.cache._ip.items()},
            **{("ref",) + k: v for k, v in patch.cache._ref.items()}}


def _expected_kv_bytes(full, cond, ref_tokens, identities, itemsize):
    """K and V: [1, tokens, dim] per block and identity; ID tokens carry the adapter's registers."""
    ip_tokens = cond.id_tokens[COND].shape[1] + full.ip_layers["0"].n_registers
    return 2 * CFG.num_layers * len(identities) * (ip_tokens + ref_tokens) * CFG.dim * itemsize


def test_precomputed_kv_equals_lazy_bit_for_bit(parts):
    model, full, prompt, negative, emb, ref_c, ref_u = parts
    cond = make_conditioning(full, emb, ref_c, ref_u)
    pre = LynxPatch(full, cond)
    nbytes = pre.precompute(model.blocks, torch.device("cpu"), torch.float32)
    assert nbytes == pre.cache.nbytes() == _expected_kv_bytes(full, cond, ref_c[0].shape[1], (COND, UNCOND), 4)
    assert len(pre.cache._ip) == len(pre.cache._ref) == 2 * CFG.num_layers
    before = _kv_entries(pre)
    a = generate(model, prompt, negative, SHAPE, _settings(sampler="unipc"), pre)
    b = generate(model, prompt, negative, SHAPE, _settings(sampler="unipc"), LynxPatch(full, cond))
    assert torch.equal(a, b)
    # The steps used the precomputed entries; nothing was recomputed or added.
    after = _kv_entries(pre)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


@pytest.fixture()
def borrows(monkeypatch):
    """Records every module lynx_core.lynx borrows to a device, and how many are borrowed at once."""
    import lynx_core.lynx as lynx_mod

    real = lynx_mod.borrow_to_device
    log = {"modules": [], "live": 0, "max_live": 0}

    @contextmanager
    def recording(module, device, **kw):
        log["modules"].append(module)
        log["live"] += 1
        log["max_live"] = max(log["max_live"], log["live"])
        try:
            with real(module, device, **kw) as m:
                yield m
        finally:
            log["live"] -= 1

    monkeypatch.setattr(lynx_mod, "borrow_to_device", recording)
    return log


# The CPU with a device index is another device to the placement checks, and moving a tensor there
# makes a real copy: it stands in for a GPU on machines without one.
OTHER = torch.device("cpu", 1)


def test_precompute_streams_one_adapter_layer_at_a_time_and_leaves_weights_in_place(parts, borrows):
    model, full, _p, _n, emb, ref_c, ref_u = parts
    cond = make_conditioning(full, emb, ref_c, ref_u)
    weights = {id(t): t.data_ptr() for t in (*full.parameters(), *model.parameters())}
    patch = LynxPatch(full, cond)
    nbytes = patch.precompute(model.blocks, OTHER, torch.float32)
    assert nbytes == _expected_kv_bytes(full, cond, ref_c[0].shape[1], (COND, UNCOND), 4)
    layers = {id(m) for m in (*full.ip_layers.values(), *full.ref_layers.values())}
    norms = {id(b.self_attn.norm_k) for b in model.blocks} | {id(b.cross_attn.norm_k) for b in model.blocks}
    borrowed_layers = [m for m in borrows["modules"] if id(m) in layers]
    # one borrow per layer and identity, never two layers at once (a layer plus the block's norm_k)
    assert len(borrowed_layers) == 2 * len(layers) and {id(m) for m in borrowed_layers} == layers
    assert {id(m) for m in borrows["modules"] if id(m) not in layers} == norms
    assert borrows["max_live"] == 2
    # the borrowed copies were dropped: every weight is its original tensor again
    assert {id(t): t.data_ptr() for t in (*full.parameters(), *model.parameters())} == weights
    # and the keys/values are those computed in place
    here = LynxPatch(full, cond)
    here.precompute(model.blocks, "cpu", torch.float32)
    for key, (k, v) in _kv_entries(patch).items():
        assert torch.equal(k, _kv_entries(here)[key][0]) and torch.equal(v, _kv_entries(here)[key][1])


def test_norms_that_move_themselves_are_called_as_they_are(parts, borrows):
    model, full, _p, _n, emb, ref_c, ref_u = parts
    cond = make_conditioning(full, emb, ref_c, ref_u)
    seen = []
    patch = LynxPatch(full, cond, norm_moves_itself=lambda m: seen.append(m) or True)
    patch.precompute(model.blocks, OTHER, torch.float32, identities=(COND,))
    layers = {id(m) for m in (*full.ip_layers.values(), *full.ref_layers.values())}
    assert all(id(m) in layers for m in borrows["modules"])
    assert {id(m) for m in seen} == ({id(b.self_attn.norm_k) for b in model.blocks}
                                     | {id(b.cross_attn.norm_k) for b in model.blocks})


def test_precompute_follows_scales_and_identities(parts):
    model, full, _p, _n, emb, ref_c, ref_u = parts
    cond = make_conditioning(full, emb, ref_c, ref_u)
    no_ip = LynxPatch(full, cond, ip_scale=0.0)
    no_ip.precompute(model.blocks, "cpu", torch.float32, identities=(COND,))
    assert not no_ip.cache._ip and sorted(no_ip.cache._ref) == [(i, COND) for i in range(CFG.num_layers)]
    off = LynxPatch(full, cond, ip_scale=0.0, ref_scale=0.0)
    assert off.precompute(model.blocks, "cpu", torch.float32) == 0
    with pytest.raises(ValueError, match="identity"):
        LynxPatch(full, cond).precompute(model.blocks, "cpu", torch.float32, identities=("face",))


def test_entries_for_another_dtype_are_recomputed_lazily(parts):
    """A precompute in the wrong dtype is not reused: the block gets what the lazy path gives."""
    model, full, _p, _n, emb, ref_c, ref_u = parts
    cond = make_conditioning(full, emb, ref_c, ref_u)
    pre = LynxPatch(full, cond)
    pre.precompute(model.blocks, "cpu", torch.bfloat16)
    lazy = LynxPatch(full, cond)
    blk = model.blocks[1]
    got = pre.block_inputs(1, blk, [COND, UNCOND], torch.device("cpu"), torch.float32)
    want = lazy.block_inputs(1, blk, [COND, UNCOND], torch.device("cpu"), torch.float32)
    for g, w in ((got.ip, want.ip), (got.ref, want.ref)):
        assert g[0].dtype == torch.float32 and torch.equal(g[0], w[0]) and torch.equal(g[1], w[1])
    assert pre.cache._ip[(0, COND)][0].dtype == torch.bfloat16  # other blocks keep their entries


# -- settings: variant defaults and the scales ------------------------------------------------


def _lite(emb):
    lite = LynxAdapters.create("lite", dim=CFG.dim, num_blocks=CFG.num_layers, **{**SMALL, "id_dim": 24}).eval()
    _perturb(lite, 5)
    return lite, LynxPatch(lite, make_conditioning(lite, emb))


def test_default_guidance_follows_the_adapters_variant(parts):
    """Lite runs two-pass CFG by default (the official lite CLI), full three-pass with cfg_id 2."""
    model, full, prompt, negative, emb, ref_c, ref_u = parts
    lite, lite_patch = _lite(emb)
    full_patch = LynxPatch(full, make_conditioning(full, emb, ref_c, ref_u))
    assert GenerationSettings().resolved(lite_patch).cfg_id == 0.0
    assert GenerationSettings().resolved(full_patch).cfg_id == 2.0
    assert GenerationSettings().resolved(None).cfg_id == 2.0
    assert GenerationSettings(cfg_id=3.0).resolved(lite_patch).cfg_id == 3.0  # an explicit value wins
    assert GenerationSettings.for_variant("lite", steps=4).cfg_id == 0.0
    with pytest.raises(ValueError, match="variant"):
        GenerationSettings.for_variant("medium")

    default = generate(model, prompt, negative, SHAPE, _settings(), lite_patch)
    two_pass = generate(model, prompt, negative, SHAPE, _settings(cfg_id=0.0), lite_patch)
    three_pass = generate(model, prompt, negative, SHAPE, _settings(cfg_id=2.0), lite_patch)
    assert torch.equal(default, two_pass)
    assert not torch.allclose(default, three_pass)
    full_default = generate(model, prompt, negative, SHAPE, _settings(), full_patch)
    assert torch.equal(full_default, generate(model, prompt, negative, SHAPE, _settings(cfg_id=2.0), full_patch))


def test_settings_scales_drive_the_patch_for_one_generation(parts):
    model, full, prompt, negative, emb, ref_c, ref_u = parts
    cond = make_conditioning(full, emb, ref_c, ref_u)
    base = generate(model, prompt, negative, SHAPE, _settings(), None)
    patch = LynxPatch(full, cond)
    # zero scales in the settings turn both adapters off, as zero scales on the patch do
    off = generate(model, prompt, negative, SHAPE, _settings(ip_scale=0.0, ref_scale=0.0), patch)
    assert torch.equal(off, base)
    assert (patch.ip_scale, patch.ref_scale) == (1.0, 1.0) and patch.active  # the patch's own scales are back
    # a half scale from the settings equals a half scale on the patch; None keeps the patch's
    half = generate(model, prompt, negative, SHAPE, _settings(ip_scale=0.5, ref_scale=0.25), patch)
    own = generate(model, prompt, negative, SHAPE, _settings(), LynxPatch(full, cond, ip_scale=0.5, ref_scale=0.25))
    assert torch.equal(half, own)
    full_scales = generate(model, prompt, negative, SHAPE, _settings(), patch)
    assert not torch.allclose(half, full_scales)
