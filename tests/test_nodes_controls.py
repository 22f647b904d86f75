"""Sampling controls in the ComfyUI glue, without ComfyUI: inputs, block subsets in the block patches,
per-step schedules in the guider (step from transformer_options["sample_sigmas"]), reference_loras.

The block patches run on lynx_core's reference Wan DiT with lynx_core's RoPE/attention (as in
tests/test_nodes_patch.py); the guider runs on a stand-in of ``comfy.samplers`` that records what
it is asked to evaluate. The real-ComfyUI runs are in tests/e2e/test_controls_e2e.py.
"""
from __future__ import annotations

import sys
import types
import uuid

import numpy as np
import pytest
import torch

import nodes.guider as guider_mod
import nodes.wan_patch as wp
from lynx_core.adapters import LynxAdapters
from lynx_core.attention import attention_sdpa
from lynx_core.face.types import FaceIdentity
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.sampling.schedule import flow_sigmas
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope
from nodes.payloads import AdaptersHandle
from nodes.reference import LynxEncodeReference, without_weight_patches
from nodes.sampling import CONTROL_NAMES, LynxGuider, LynxSampler, build_guider

CFG = WAN_CONFIGS["tiny"]
KW = dict(dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=64, resampler_heads=1, resampler_dim_head=64,
          resampler_depth=1)
STEPS = 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    adapters = LynxAdapters.create("full", **KW).eval()
    refs = [{b: torch.randn(1, 8, CFG.dim) for b in range(CFG.num_layers)} for _ in range(2)]
    emb = torch.nn.functional.normalize(torch.randn(512), dim=0)
    conditioning = make_conditioning(adapters, emb, refs[0], refs[1])
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = torch.randn(1, 6, CFG.text_dim)
    with torch.no_grad():
        tokens, _grid, e, _temb, c, freqs = model.embed(x, torch.tensor([500]), ctx)
    return model, adapters, conditioning, tokens, e, c, freqs


@pytest.fixture()
def lynx_rope_attention(monkeypatch):
    monkeypatch.setattr(wp, "comfy_rope", apply_rope)
    monkeypatch.setattr(wp, "comfy_attention", lambda _to: attention_sdpa)


def _args(tokens, e, c, freqs, rows, cond_or_uncond):
    rep = lambda t: t.expand(rows, *t.shape[1:]).contiguous()  # noqa: E731
    return {"img": rep(tokens), "txt": rep(c), "vec": rep(e), "pe": freqs,
            "transformer_options": {"cond_or_uncond": cond_or_uncond}}


SIGMAS = flow_sigmas(STEPS, 3.0)[0].float()


# ------------------------------------------------------------------ inputs
def test_new_inputs_are_optional_strings_in_the_agreed_order():
    sampler = LynxSampler.INPUT_TYPES()
    guider = LynxGuider.INPUT_TYPES()
    tail = list(CONTROL_NAMES)
    assert tail == ["ip_blocks", "ref_blocks", "cfg_schedule", "cfg_id_schedule", "ip_scale_schedule",
                    "ref_scale_schedule"]
    s_opt, g_opt = list(sampler["optional"]), list(guider["optional"])
    assert s_opt[:2] == ["reference", "denoise"] and s_opt[2:8] == tail
    assert g_opt[0] == "reference" and g_opt[1:7] == tail
    for name in tail:
        for spec in (sampler["optional"][name], guider["optional"][name]):
            assert spec[0] == "STRING" and spec[1]["default"] == "" and spec[1]["tooltip"]
        assert name not in sampler["required"] and name not in guider["required"]
    assert "0:5.0, 0.6:3.0" in sampler["optional"]["cfg_schedule"][1]["tooltip"]
    ref = LynxEncodeReference.INPUT_TYPES()
    assert list(ref["optional"])[0] == "reference_loras"
    spec = ref["optional"]["reference_loras"]
    assert spec[0] == "BOOLEAN" and spec[1]["default"] is False and "frozen base" in spec[1]["tooltip"]


# ------------------------------------------------------------------ block subsets in the block patch
def test_blocks_outside_the_subsets_run_comfyuis_own_block(setup, lynx_rope_attention):
    model, adapters, conditioning, tokens, e, c, freqs = setup
    patch = LynxPatch(adapters, conditioning, ip_blocks="1", ref_blocks="1, 3")
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks), cond_identities=[COND])
    sentinel = {"img": "ComfyUI's block"}
    ran_lynx = []
    for i in range(CFG.num_layers):
        out = wp.LynxBlockPatch(i, state)(_args(tokens, e, c, freqs, 1, [0]), {"original_block": lambda a: sentinel})
        ran_lynx.append(out is not sentinel)
    assert ran_lynx == [False, True, False, True]
    # none of both: every block is ComfyUI's own (plain Wan)
    none = wp.LynxRunState(patch=LynxPatch(adapters, conditioning, ip_blocks="none", ref_blocks="none"),
                           blocks=list(model.blocks))
    for i in range(CFG.num_layers):
        assert wp.LynxBlockPatch(i, none)(_args(tokens, e, c, freqs, 1, [0]),
                                          {"original_block": lambda a: sentinel}) is sentinel


# ------------------------------------------------------------------ the step from sample_sigmas
def test_update_window_records_the_step_and_the_patch_scale(setup):
    _model, adapters, conditioning, *_ = setup
    patch = LynxPatch(adapters, conditioning, ip_scale_schedule="0:1, 0.5:0.25", ref_scale_schedule="1, 2, 3, 4")
    st = wp.LynxRunState(patch=patch)
    seen = []
    for k in range(STEPS):
        st.update_window(float(SIGMAS[k]), SIGMAS)
        seen.append((st.step, patch.current_scales()))
    assert seen == [((0, 4), (1.0, 1.0)), ((1, 4), (1.0, 2.0)), ((2, 4), (0.25, 3.0)), ((3, 4), (0.25, 4.0))]
    # a sampler's evaluation between two step sigmas belongs to the earlier step
    st.update_window(float(SIGMAS[1] + SIGMAS[2]) / 2, SIGMAS)
    assert st.step == (1, 4)
    st.update_window(0.5, None)  # ComfyUI did not say: the constants apply
    assert st.step is None and patch.current_scales() == (1.0, 1.0)
    st.release()
    assert st.step is None and patch.step is None


def _block_outputs(state, setup, steps=STEPS):
    """Every block's output at every step (three rows c, u, i), as ComfyUI would call the patches."""
    model, _adapters, _cond, tokens, e, c, freqs = setup
    outs = []
    with torch.no_grad():
        for k in range(steps):
            state.update_window(float(SIGMAS[k]), SIGMAS)
            outs.append([wp.LynxBlockPatch(i, state)(_args(tokens, e, c, freqs, 3, [0, 1, 2]),
                                                     {"original_block": lambda a: {"img": a["img"]}})["img"]
                         for i in range(CFG.num_layers)])
    return outs


@pytest.mark.parametrize("kw", [dict(ip_scale_schedule="0.7, 0.7, 0.7, 0.7", ref_scale_schedule="0:1.2"),
                                dict(ip_blocks="", ref_blocks="")])
def test_node_schedules_equal_to_constants_are_bit_identical(setup, lynx_rope_attention, kw):
    _model, adapters, conditioning, *_ = setup
    blocks = list(setup[0].blocks)
    const = wp.LynxRunState(patch=LynxPatch(adapters, conditioning, ip_scale=0.7, ref_scale=1.2), blocks=blocks,
                            cond_identities=[COND, UNCOND, COND])
    sched = wp.LynxRunState(patch=LynxPatch(adapters, conditioning, ip_scale=0.7, ref_scale=1.2, **kw), blocks=blocks,
                            cond_identities=[COND, UNCOND, COND])
    for a, b in zip(_block_outputs(const, setup), _block_outputs(sched, setup)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_node_scale_schedule_changes_only_the_steps_from_k(setup, lynx_rope_attention):
    _model, adapters, conditioning, *_ = setup
    blocks = list(setup[0].blocks)
    const = wp.LynxRunState(patch=LynxPatch(adapters, conditioning), blocks=blocks,
                            cond_identities=[COND, UNCOND, COND])
    sched = wp.LynxRunState(patch=LynxPatch(adapters, conditioning, ip_scale_schedule="0:1, 0.75:0.5"), blocks=blocks,
                            cond_identities=[COND, UNCOND, COND])
    a, b = _block_outputs(const, setup), _block_outputs(sched, setup)
    for k in range(STEPS):
        same = all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
        assert same == (k < 3), k


def test_scale_schedule_composes_with_the_window(setup, lynx_rope_attention):
    _model, adapters, conditioning, *_ = setup
    st = wp.LynxRunState(patch=LynxPatch(adapters, conditioning, ip_scale_schedule="0:3"), blocks=list(setup[0].blocks),
                         start_percent=0.5, end_percent=1.0)
    active = []
    for k in range(STEPS):
        active.append(st.update_window(float(SIGMAS[k]), SIGMAS))
    assert active == [False, False, True, True]


# ------------------------------------------------------------------ the guider on a stand-in comfy
class _GuiderBase:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = {"transformer_options": {}}
        self.conds = {}

    def set_conds(self, positive, negative):
        self.conds = {"positive": positive, "negative": negative}

    def outer_sample(self, *args, **kwargs):
        return "sampled"

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        return "denoised"


@pytest.fixture()
def fake_comfy(monkeypatch):
    calls = []

    def calc_cond_batch(model, conds, x, timestep, model_options):
        calls.append(conds)
        return [torch.full((1, 4), float(i + 1)) for i in range(len(conds))]  # c = 1, u = 2, i = 3

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


def _step_outputs(g, calls):
    """The guider's output and its number of passes at each step of SIGMAS."""
    out = []
    opts = {"transformer_options": {"sample_sigmas": SIGMAS}}
    for k in range(STEPS):
        calls.clear()
        y = g.predict_noise(torch.zeros(1), SIGMAS[k:k + 1], model_options=opts)
        out.append((len(calls[0]), float(y[0, 0])))
    return out


def test_guider_follows_cfg_and_cfg_id_schedules_per_step(fake_comfy):
    calls = fake_comfy
    g = guider_mod.guider_class()(object(), wp.LynxRunState(), cfg=5.0, cfg_id=2.0,
                                  cfg_schedule="0:5, 0.5:3", cfg_id_schedule="2, 2, 1, 2")
    g.conds = {"positive": [{"p": 1}], "negative": [{"n": 1}]}
    g.inner_model = None
    c, u, i = 1.0, 2.0, 3.0
    three = lambda cfg, cfg_id: u + cfg_id * (i - u) + cfg * (c - i)  # noqa: E731
    two = lambda cfg: u + (c - u) * cfg  # noqa: E731
    assert _step_outputs(g, calls) == [(3, three(5, 2)), (3, three(5, 2)), (2, two(3)), (3, three(3, 2))]
    # cfg <= 1 at a step: the positive pass alone there
    g1 = guider_mod.guider_class()(object(), wp.LynxRunState(), cfg=5.0, cfg_id=2.0, cfg_schedule="5, 1, 5, 5")
    g1.conds, g1.inner_model = g.conds, None
    assert [n for n, _ in _step_outputs(g1, calls)] == [3, 1, 3, 3]


def test_guider_schedules_equal_to_constants_give_the_same_numbers(fake_comfy):
    calls = fake_comfy
    conds = {"positive": [{"p": 1}], "negative": [{"n": 1}]}
    const = guider_mod.guider_class()(object(), wp.LynxRunState(), cfg=4.5, cfg_id=1.5)
    sched = guider_mod.guider_class()(object(), wp.LynxRunState(), cfg=1.0, cfg_id=0.0,
                                      cfg_schedule="4.5, 4.5, 4.5, 4.5", cfg_id_schedule="0:1.5")
    for g in (const, sched):
        g.conds, g.inner_model = conds, None
    assert _step_outputs(const, calls) == _step_outputs(sched, calls)


def test_guider_checks_list_lengths_when_sampling_starts(fake_comfy, setup):
    _model, adapters, conditioning, *_ = setup
    g = guider_mod.guider_class()(object(), wp.LynxRunState(), cfg=5.0, cfg_id=2.0, cfg_schedule="5, 5, 4")
    with pytest.raises(ValueError, match=r"cfg_schedule: 3 values for 4 steps"):
        g.inner_sample(torch.zeros(1, 16, 2, 4, 4), None, torch.device("cpu"), None, SIGMAS)
    state = wp.LynxRunState(patch=LynxPatch(adapters, conditioning, ref_scale_schedule="1, 1"), blocks=[])
    g = guider_mod.guider_class()(object(), state, cfg=5.0, cfg_id=2.0)
    with pytest.raises(ValueError, match=r"ref_scale_schedule: 2 values for 4 steps"):
        g.inner_sample(torch.zeros(1, 16, 2, 4, 4), None, torch.device("cpu"), None, SIGMAS)
    # a list of the right length passes (and the keys/values are computed for the passes it needs)
    state = wp.LynxRunState(patch=LynxPatch(adapters, conditioning), blocks=list(setup[0].blocks))
    g = guider_mod.guider_class()(object(), state, cfg=5.0, cfg_id=0.0, cfg_id_schedule="0, 0, 3, 3")
    assert g.passes_needed() == 3
    assert g.inner_sample(torch.zeros(1, 16, 2, 4, 4), None, torch.device("cpu"), None, SIGMAS) == "denoised"
    assert {ident for _b, ident in state.patch.cache._ip} == {COND, UNCOND}


# ------------------------------------------------------------------ build_guider
class _Patcher:
    def __init__(self, model):
        self.model = model
        self.replaced, self.wrappers = {}, {}
        self.patches = {}

    def clone(self):
        c = _Patcher(self.model)
        c.patches = {k: list(v) for k, v in self.patches.items()}
        c.patches_uuid = getattr(self, "patches_uuid", None)
        return c

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.replaced[(name, block_name, number)] = patch

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers[(wrapper_type, key)] = fn


def _face() -> FaceIdentity:
    emb = torch.nn.functional.normalize(torch.randn(512), dim=0)
    return FaceIdentity(embedding=emb, landmarks=np.zeros((1, 5, 2), np.float32),
                        crop112=np.zeros((1, 112, 112, 3), np.uint8), crop256=np.full((1, 256, 256, 3), 90, np.uint8),
                        faces_found=[1], chosen=[[0]], provider="cpu")


def _conds(tag):
    return [{"cross_attn": tag, "model_conds": {}, "uuid": uuid.uuid4()}]


def _build(setup, **controls):
    model, adapters, *_ = setup
    user = _Patcher(types.SimpleNamespace(diffusion_model=model))
    handle = AdaptersHandle(adapters=adapters, source="full")
    return build_guider(user, handle, _face(), _conds("p"), _conds("n"), 5.0, 2.0, 0.9, 0.0, 0.0, 1.0, 0,
                        controls=controls)


def test_build_guider_passes_the_controls_on(fake_comfy, setup):
    g = _build(setup, ip_blocks="0-1, 3", ref_blocks="", cfg_schedule="0:5, 0.5:4", cfg_id_schedule="",
               ip_scale_schedule="1, 1, 0.5, 0.5", ref_scale_schedule="")
    patch = g.state.patch
    assert patch.ip_blocks == frozenset({0, 1, 3}) and patch.ref_blocks is None
    assert patch.ip_scale_schedule.values == (1.0, 1.0, 0.5, 0.5) and patch.ref_scale_schedule is None
    assert g.cfg_schedule.values == (5.0, 4.0) and g.cfg_id_schedule is None
    today = _build(setup)
    assert today.state.patch.ip_blocks is None and today.cfg_schedule is None


@pytest.mark.parametrize("controls,match", [
    (dict(ip_blocks="7"), rf"ip_blocks: block 7 is out of range; the model has {CFG.num_layers} blocks"),
    (dict(ref_blocks="0-x"), r"ref_blocks: '0-x' is not a block index or range"),
    (dict(cfg_schedule="0.5:3"), r"cfg_schedule: the first keyframe must be at 0"),
    (dict(cfg_id_schedule="2, two"), r"cfg_id_schedule: 'two' is not a number"),
    (dict(ip_scale_schedule="1, -1"), r"ip_scale_schedule: '-1' is below 0"),
    (dict(ref_scale_schedule="0:1, 0.5:1, 0.2:1"), r"ref_scale_schedule: keyframe '0.2:1' does not come after"),
])
def test_build_guider_refuses_bad_controls_naming_the_input(fake_comfy, setup, controls, match):
    with pytest.raises(ValueError, match=match):
        _build(setup, **controls)


# ------------------------------------------------------------------ reference_loras
def test_reference_runs_on_a_clone_without_weight_patches(setup):
    model = setup[0]
    plain = _Patcher(types.SimpleNamespace(diffusion_model=model))
    assert without_weight_patches(plain) is plain  # nothing to remove: the MODEL itself, no reload
    lora = plain.clone()
    lora.patches = {"diffusion_model.blocks.0.self_attn.q.weight": [("lora", 1.0)]}
    lora.patches_uuid = uuid.uuid4()
    base = without_weight_patches(lora)
    assert base is not lora and base.patches == {} and base.patches_uuid != lora.patches_uuid
    assert lora.patches and base.model is lora.model  # the user's MODEL keeps its LoRA
