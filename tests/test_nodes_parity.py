"""Review fixes of the ComfyUI path against the official behaviour (no ComfyUI needed).

* the image-only pass gets its own cond uuids (ComfyUI step caches key on them),
* the official start is exactly the official noise after ComfyUI's σ0 scaling,
* a face without identity (pass_through) runs plain Wan, also through Encode Reference,
* image-conditioned Wan models (Wan2.2-I2V-A14B has no image embedder) are refused,
* an empty reference says why it is empty.

The real-ComfyUI counterparts (prepare_noise, uni_pc_bh2, calc_cond_batch) are in
tests/e2e/test_comfy_e2e.py.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import uuid

import numpy as np
import pytest
import torch

import nodes.guider as guider_mod
import nodes.wan_patch as wp
from lynx_core.adapters import LynxAdapters
from lynx_core.face.types import FaceIdentity
from lynx_core.sampling.schedule import flow_sigmas
from lynx_core.seeds import initial_noise
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from nodes.payloads import AdaptersHandle, ReferenceFeatures
from nodes.reference import LynxEncodeReference
from nodes.sampling import build_guider, pure_noise_start

CFG = WAN_CONFIGS["tiny"]
KW = dict(dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=64, resampler_heads=1, resampler_dim_head=64,
          resampler_depth=1)


class _GuiderBase:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.conds = {}

    def set_conds(self, positive, negative):
        self.conds = {"positive": positive, "negative": negative}

    def outer_sample(self, *args, **kwargs):
        return "sampled"


class _Patcher:
    def __init__(self, model):
        self.model = model
        self.replaced, self.wrappers = {}, {}

    def clone(self):
        return _Patcher(self.model)

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.replaced[(name, block_name, number)] = patch

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers[(wrapper_type, key)] = fn


@pytest.fixture()
def comfy_stub(monkeypatch):
    """comfy.samplers / comfy.patcher_extension stand-ins that record what the guider evaluates."""
    calls = []

    def calc_cond_batch(model, conds, x, timestep, model_options):
        calls.append(conds)
        return [torch.full((1, 4), float(i)) for i in range(len(conds))]

    def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale

    samplers = types.SimpleNamespace(CFGGuider=_GuiderBase, calc_cond_batch=calc_cond_batch, cfg_function=cfg_function)
    ext = types.SimpleNamespace(WrappersMP=types.SimpleNamespace(DIFFUSION_MODEL="diffusion_model"))
    comfy = types.ModuleType("comfy")
    comfy.samplers, comfy.patcher_extension = samplers, ext
    for name, mod in (("comfy", comfy), ("comfy.samplers", samplers), ("comfy.patcher_extension", ext)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(guider_mod, "_CLASS", None)
    yield calls
    guider_mod._CLASS = None


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return WanModel(CFG).eval()


def _face(identity: bool) -> FaceIdentity:
    emb = torch.nn.functional.normalize(torch.randn(512), dim=0) if identity else None
    n = 1 if identity else 0
    return FaceIdentity(embedding=emb, landmarks=np.zeros((n, 5, 2), np.float32),
                        crop112=np.zeros((n, 112, 112, 3), np.uint8), crop256=np.full((n, 256, 256, 3), 90, np.uint8),
                        faces_found=[n], chosen=[[0] * n], provider="cpu")


def _handle(variant="full") -> AdaptersHandle:
    torch.manual_seed(1)
    return AdaptersHandle(adapters=LynxAdapters.create(variant, **KW).eval(), source=variant)


def _conds(tag: str) -> list[dict]:
    return [{"cross_attn": tag, "model_conds": {}, "uuid": uuid.uuid4()}]


# ------------------------------------------------------------------ i-pass uuids
def test_image_only_pass_has_its_own_stable_uuids(comfy_stub):
    """ComfyUI's EasyCache stores one cache entry per transformer_options["uuids"] entry: the u and
    i rows must not share a uuid, and the uuids must not change from step to step."""
    calls = comfy_stub
    pos, neg = _conds("pos"), _conds("neg")
    g = guider_mod.guider_class()(object(), wp.LynxRunState(), cfg=5.0, cfg_id=2.0)
    g.conds = {"positive": pos, "negative": neg}
    g.inner_model = None
    for sigma in (0.9, 0.5):
        g.predict_noise(torch.zeros(1), torch.tensor([sigma]), model_options={})
    first, second = calls
    assert first[0] is pos and first[1] is neg
    image_only = first[2]
    assert [c["cross_attn"] for c in image_only] == ["neg"]
    assert image_only[0]["uuid"] not in {neg[0]["uuid"], pos[0]["uuid"]}
    assert second[2] is image_only, "the i-pass copies (and their uuids) must stay the same for every step"
    assert neg[0]["uuid"] == first[1][0]["uuid"], "the negative conds themselves are not modified"
    g.outer_sample()
    g.predict_noise(torch.zeros(1), torch.tensor([0.9]), model_options={})
    assert calls[-1][2][0]["uuid"] != image_only[0]["uuid"], "a new run gets new copies"


# ------------------------------------------------------------------ pure-noise start
@pytest.mark.parametrize("steps,shift", [(50, 3.0), (50, 5.0), (4, 1.0)])
def test_pure_noise_start_gives_the_official_noise_back(steps, shift):
    """ComfyUI starts from σ0·noise + (1 − σ0)·latent (latent = 0); the official run starts from the
    noise itself (float32 from a CPU generator seeded with the seed)."""
    sigma0 = flow_sigmas(steps, shift)[0].to(torch.float32)[0]
    noise = initial_noise(42, (1, 16, 5, 60, 104))
    start = pure_noise_start(noise, sigma0)
    x = sigma0 * start + (1.0 - sigma0) * torch.zeros_like(noise)  # ComfyUI's CONST.noise_scaling
    ulp = torch.nextafter(noise.abs(), torch.tensor(float("inf"))) - noise.abs()
    assert ((x - noise).abs() <= ulp).all()
    assert (x != noise).float().mean() < 1e-3
    assert not torch.allclose(sigma0 * noise, noise, rtol=0, atol=1e-5), "σ0·noise is not the official start"


# ------------------------------------------------------------------ no identity: plain Wan
def test_face_without_identity_samples_plain_wan(comfy_stub, wan, caplog):
    """pass_through with no face: no error about the missing reference, no adapters, ordinary CFG."""
    calls = comfy_stub
    user = _Patcher(types.SimpleNamespace(diffusion_model=wan))
    pos, neg = _conds("pos"), _conds("neg")
    with caplog.at_level("WARNING"):
        g = build_guider(user, _handle("full"), _face(False), pos, neg, 5.0, 2.0, 1.0, 1.0, 0.0, 1.0, 0,
                         reference=None)
    assert "plain Wan" in caplog.text
    assert g.state.patch is None and g.cfg == 5.0 and g.cfg_id <= 1.0
    g.conds = {"positive": pos, "negative": neg}
    g.inner_model = None
    out = g.predict_noise(torch.zeros(1), torch.tensor([0.5]), model_options={})
    assert calls[-1] == [pos, neg], "without an identity the image-only pass equals u: two passes"
    torch.testing.assert_close(out, torch.full((1, 4), 1.0 + 5.0 * (0.0 - 1.0)))  # u + cfg·(c − u)
    patch = next(iter(g.model_patcher.replaced.values()))
    sentinel = {"img": "ComfyUI's own block"}
    args = {"img": torch.zeros(1, 4, CFG.dim), "transformer_options": {"cond_or_uncond": [0]}}
    assert patch(args, {"original_block": lambda a: sentinel}) is sentinel


def test_face_without_identity_passes_through_encode_reference(wan, caplog):
    user = _Patcher(types.SimpleNamespace(diffusion_model=wan))
    with caplog.at_level("WARNING"):
        (ref,) = LynxEncodeReference().encode(user, vae=None, clip=None, face=_face(False), adapters=_handle("full"),
                                              seed=42)
    assert isinstance(ref, ReferenceFeatures) and not ref.cond and not ref.uncond
    assert "no usable face" in caplog.text


def test_window_is_still_checked_without_identity(comfy_stub, wan):
    user = _Patcher(types.SimpleNamespace(diffusion_model=wan))
    with pytest.raises(ValueError, match="start_percent"):
        build_guider(user, _handle("lite"), _face(False), _conds("p"), _conds("n"), 5.0, 2.0, 1.0, 1.0, 0.8, 0.2, 0)


# ------------------------------------------------------------------ input errors
def test_empty_reference_explains_why(comfy_stub, wan):
    user = _Patcher(types.SimpleNamespace(diffusion_model=wan))
    empty = ReferenceFeatures(cond={}, uncond={}, dim=CFG.dim, num_blocks=CFG.num_layers, seed=42)
    with pytest.raises(ValueError, match="reference: .*lite adapters.*ref_scale to 0"):
        build_guider(user, _handle("full"), _face(True), _conds("p"), _conds("n"), 5.0, 2.0, 1.0, 1.0, 0.0, 1.0, 0,
                     reference=empty)
    with pytest.raises(ValueError, match="reference: .*Connect Lynx Encode Reference.*ref_scale to 0"):
        build_guider(user, _handle("full"), _face(True), _conds("p"), _conds("n"), 5.0, 2.0, 1.0, 1.0, 0.0, 1.0, 0)
    # ref_scale 0: full adapters without a reference are fine.
    g = build_guider(user, _handle("full"), _face(True), _conds("p"), _conds("n"), 5.0, 2.0, 1.0, 0.0, 0.0, 1.0, 0)
    assert g.state.patch is not None and not g.state.patch.has_reference


def test_image_conditioned_wan_is_refused():
    """Wan2.2-I2V-A14B: 14B width and depth, no img_emb, but 36 input channels for 16 output ones."""
    i2v = WanModel(dataclasses.replace(CFG, in_dim=36))
    i2v.out_dim = 16  # ComfyUI's WanModel carries in_dim/out_dim
    with pytest.raises(wp.WanModelError, match="model: .*image-to-video.*T2V"):
        wp.wan_diffusion_model(_Patcher(types.SimpleNamespace(diffusion_model=i2v)))
    t2v = WanModel(CFG)
    t2v.out_dim = 16
    assert wp.wan_diffusion_model(_Patcher(types.SimpleNamespace(diffusion_model=t2v)))[1:] == (CFG.dim, CFG.num_layers)


def test_wider_model_error_names_both_sizes():
    adapters = LynxAdapters.create("full", device="meta")
    with pytest.raises(Exception, match=r"5120-wide 40-block Wan model \(Wan 14B\).*'model' input is 1536-wide with "
                                        r"30 blocks \(Wan 1\.3B\); use Wan2\.1-T2V-14B"):
        adapters.check_fits(1536, 30, model_name="'model' input")
