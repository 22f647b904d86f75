"""The ComfyUI glue without ComfyUI: block patch row mapping, adapter window, official timesteps, guider.

The block patch runs on lynx_core's reference Wan DiT (same module names as ComfyUI's); ComfyUI's
RoPE/attention are swapped for lynx_core's. The guider is built on a minimal stand-in of
``comfy.samplers`` that records what the guider asks ComfyUI to evaluate.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

import nodes.guider as guider_mod
import nodes.wan_patch as wp
from lynx_core.adapters import LynxAdapters
from lynx_core.attention import attention_sdpa
from lynx_core.block import wan_block_forward
from lynx_core.guidance import adapter_window_active
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.sampling.schedule import flow_sigmas
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope

CFG = WAN_CONFIGS["tiny"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    adapters = LynxAdapters.create("full", dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=64,
                                   resampler_heads=1, resampler_dim_head=64, resampler_depth=1).eval()
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


def test_block_patch_gives_each_row_its_identity(setup, lynx_rope_attention):
    model, adapters, conditioning, tokens, e, c, freqs = setup
    patch = LynxPatch(adapters, conditioning, ip_scale=0.8, ref_scale=1.3)
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks), cond_identities=[COND, UNCOND, COND])
    bp = wp.LynxBlockPatch(1, state)

    def never(_args):
        raise AssertionError("the Lynx block must run while the adapters are active")

    with torch.no_grad():
        out = bp(_args(tokens, e, c, freqs, 3, [0, 1, 2]), {"original_block": never})["img"]
        expected = {}
        for ident in (COND, UNCOND):
            inputs = patch.block_inputs(1, model.blocks[1], [ident], device=tokens.device, dtype=tokens.dtype)
            expected[ident] = wan_block_forward(model.blocks[1], tokens, e, freqs, c, rope=apply_rope,
                                                attention=attention_sdpa, adapters=inputs)
    torch.testing.assert_close(out[0:1], expected[COND], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:2], expected[UNCOND], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:3], expected[COND], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-4), "face and no-identity rows must differ"


def test_chunk_order_from_comfyui_is_followed(setup, lynx_rope_attention):
    """ComfyUI may batch the conds in any order; cond_or_uncond says which is which."""
    model, adapters, conditioning, tokens, e, c, freqs = setup
    patch = LynxPatch(adapters, conditioning)
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks), cond_identities=[COND, UNCOND])
    bp = wp.LynxBlockPatch(0, state)
    with torch.no_grad():
        a = bp(_args(tokens, e, c, freqs, 2, [0, 1]), {"original_block": None})["img"]
        b = bp(_args(tokens, e, c, freqs, 2, [1, 0]), {"original_block": None})["img"]
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a[1], b[0])


def test_identities_per_row():
    st = wp.LynxRunState(cond_identities=[COND, UNCOND, COND])
    assert st.identities([1, 0], 4) == [UNCOND, UNCOND, COND, COND]
    assert st.identities([2, 1, 0], 3) == [COND, UNCOND, COND]
    assert st.identities(None, 2) == [COND, COND]


def test_inactive_or_zero_scale_runs_comfyuis_own_block(setup, lynx_rope_attention):
    model, adapters, conditioning, tokens, e, c, freqs = setup
    sentinel = {"img": "comfy block"}
    off = LynxPatch(adapters, conditioning, ip_scale=0.0, ref_scale=0.0)
    state = wp.LynxRunState(patch=off, blocks=list(model.blocks))
    assert wp.LynxBlockPatch(0, state)(_args(tokens, e, c, freqs, 1, [0]), {"original_block": lambda a: sentinel}) is sentinel
    on = LynxPatch(adapters, conditioning)
    on.active = False
    state = wp.LynxRunState(patch=on, blocks=list(model.blocks))
    assert wp.LynxBlockPatch(0, state)(_args(tokens, e, c, freqs, 1, [0]), {"original_block": lambda a: sentinel}) is sentinel


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.2, 0.5), (0.0, 0.3), (0.7, 1.0), (0.5, 0.5), (0.33, 0.9)])
def test_window_follows_the_step_rule(setup, start, end):
    _model, adapters, conditioning, *_ = setup
    n = 10
    sigmas, _ = flow_sigmas(n, 3.0)
    sigmas = sigmas.float()
    st = wp.LynxRunState(patch=LynxPatch(adapters, conditioning), start_percent=start, end_percent=end)
    for k in range(n):
        assert st.update_window(float(sigmas[k]), sigmas) == adapter_window_active(k, n, start, end), k
        assert st.patch.active == adapter_window_active(k, n, start, end)


def test_window_rejects_start_after_end():
    with pytest.raises(ValueError, match="start_percent"):
        wp.LynxRunState(start_percent=0.8, end_percent=0.2)


def test_official_timesteps_replace_comfyuis_float_ones():
    sig64, ts = flow_sigmas(50, 3.0)
    st = wp.LynxRunState(timestep_sigmas=sig64[:-1], timestep_values=ts)
    comfy_t = sig64[:-1].float() * 1000.0  # what ComfyUI's flow model_sampling.timestep gives
    mapped = st.official_timestep(comfy_t)
    assert torch.equal(mapped, ts.float())
    assert mapped[0].item() == 999.0 and comfy_t[0].item() != 999.0
    other = torch.tensor([123.456])
    assert torch.equal(st.official_timestep(other), other)
    assert torch.equal(wp.LynxRunState().official_timestep(comfy_t), comfy_t)


def test_release_clears_the_cached_keys_values(setup, lynx_rope_attention):
    model, adapters, conditioning, tokens, e, c, freqs = setup
    patch = LynxPatch(adapters, conditioning)
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks))
    with torch.no_grad():
        wp.LynxBlockPatch(0, state)(_args(tokens, e, c, freqs, 1, [0]), {"original_block": None})
    assert patch.cache._ip and patch.cache._ref
    patch.active = False
    state.release()
    assert not patch.cache._ip and not patch.cache._ref and patch.active


# ------------------------------------------------------------------ guider on a stand-in comfy
class _FakeGuiderBase:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.conds = {}

    def outer_sample(self, *args, **kwargs):
        if kwargs.get("fail"):
            raise KeyboardInterrupt("interrupted")
        return "sampled"

    def inner_sample(self, noise, latent_image, device, *args, **kwargs):
        # ComfyUI runs the steps here; the test hook looks at the state the first step would see.
        return kwargs["hook"](self)


@pytest.fixture()
def fake_comfy(monkeypatch):
    calls = []
    outputs = {}

    def calc_cond_batch(model, conds, x, timestep, model_options):
        calls.append([c for c in conds])
        return [outputs["neg_i"] if i == 2 else outputs[id(c)] for i, c in enumerate(conds)]

    def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale

    samplers = types.SimpleNamespace(CFGGuider=_FakeGuiderBase, calc_cond_batch=calc_cond_batch, cfg_function=cfg_function)
    comfy = types.ModuleType("comfy")
    comfy.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    monkeypatch.setattr(guider_mod, "_CLASS", None)
    yield calls, outputs
    guider_mod._CLASS = None


def test_three_pass_guider_combines_c_u_i(fake_comfy):
    calls, outputs = fake_comfy
    pos, neg = [{"p": 1}], [{"n": 1}]
    c, u, i = (torch.randn(1, 16, 2, 4, 4) for _ in range(3))
    # calc_cond_batch answers per list position: positive -> c, negative -> u, the second negative -> i.
    outputs[id(pos)], outputs[id(neg)] = c, u
    outputs["neg_i"] = i
    state = wp.LynxRunState()
    g = guider_mod.guider_class()(object(), state, cfg=5.0, cfg_id=2.0)
    g.conds = {"positive": pos, "negative": neg}
    g.inner_model = None
    out = g.predict_noise(torch.zeros(1), torch.tensor([0.5]), model_options={})
    assert calls[-1][:2] == [pos, neg]
    # The image-only pass is the negative text again (its own copies: see test_nodes_parity).
    assert [{k: v for k, v in c.items() if k != "uuid"} for c in calls[-1][2]] == neg
    assert state.cond_identities == [COND, UNCOND, COND]
    torch.testing.assert_close(out, u + 2.0 * (i - u) + 5.0 * (c - i))
    # x0 form equals the spec's velocity form: weights sum to one.
    x, sigma = torch.randn_like(c), 0.7
    vel = lambda d: (x - d) / sigma  # noqa: E731
    torch.testing.assert_close(vel(out), vel(u) + 2.0 * (vel(i) - vel(u)) + 5.0 * (vel(c) - vel(i)), rtol=1e-4, atol=1e-4)


def test_two_pass_and_single_pass_modes(fake_comfy):
    calls, outputs = fake_comfy
    pos, neg = [{"p": 1}], [{"n": 1}]
    c, u = torch.randn(2, 3), torch.randn(2, 3)
    outputs[id(pos)], outputs[id(neg)] = c, u
    state = wp.LynxRunState()
    g = guider_mod.guider_class()(object(), state, cfg=4.0, cfg_id=1.0)
    g.conds = {"positive": pos, "negative": neg}
    g.inner_model = None
    out = g.predict_noise(torch.zeros(1), torch.tensor([0.5]), model_options={})
    assert calls[-1] == [pos, neg] and state.cond_identities == [COND, UNCOND]
    torch.testing.assert_close(out, u + 4.0 * (c - u))
    g.cfg = 1.0
    out = g.predict_noise(torch.zeros(1), torch.tensor([0.5]), model_options={})
    assert calls[-1] == [pos] and state.cond_identities == [COND]
    torch.testing.assert_close(out, c)


def test_guider_releases_caches_even_when_interrupted(fake_comfy, setup):
    _model, adapters, conditioning, *_ = setup
    patch = LynxPatch(adapters, conditioning)
    patch.cache._ip[(0, COND)] = "cached"
    state = wp.LynxRunState(patch=patch)
    g = guider_mod.guider_class()(object(), state, cfg=5.0, cfg_id=2.0)
    with pytest.raises(KeyboardInterrupt):
        g.outer_sample(fail=True)
    assert not patch.cache._ip
    patch.cache._ip[(0, COND)] = "cached"
    assert g.outer_sample() == "sampled" and not patch.cache._ip


class _FakePatcher:
    def __init__(self, model):
        self.model = model
        self.replaced, self.wrappers, self.additional = {}, {}, {}

    def clone(self):
        return _FakePatcher(self.model)

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.replaced[(name, block_name, number)] = patch

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers[(wrapper_type, key)] = fn

    def set_additional_models(self, key, models):
        self.additional[key] = models


def test_patch_model_patches_a_clone_only(setup, monkeypatch):
    model, adapters, *_ = setup
    ext = types.SimpleNamespace(WrappersMP=types.SimpleNamespace(DIFFUSION_MODEL="diffusion_model"))
    comfy = types.ModuleType("comfy")
    comfy.patcher_extension = ext
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", ext)
    user = _FakePatcher(types.SimpleNamespace(diffusion_model=model))
    clone = wp.patch_model(user, wp.LynxRunState(), official_timesteps=True)
    assert clone is not user
    assert not user.replaced and not user.wrappers and not user.additional
    assert sorted(k[2] for k in clone.replaced) == list(range(CFG.num_layers))
    assert all(k[:2] == ("dit", "double_block") for k in clone.replaced)
    assert ("diffusion_model", wp.PATCH_KEY) in clone.wrappers
    # The adapters are not an additional model: ComfyUI must not load their 4+ GB for the steps.
    assert clone.additional == {}


def test_model_checks_refuse_other_widths_and_non_wan(setup):
    model, adapters, *_ = setup
    user = _FakePatcher(types.SimpleNamespace(diffusion_model=model))
    assert wp.check_model_fits(user, adapters)[1:] == (CFG.dim, CFG.num_layers)
    wide = LynxAdapters.create("lite", dim=CFG.dim * 2, num_blocks=CFG.num_layers, resampler_dim=64,
                               resampler_heads=1, resampler_dim_head=64, resampler_depth=1, device="meta")
    with pytest.raises(Exception, match=f"{CFG.dim}-wide"):
        wp.check_model_fits(user, wide)
    with pytest.raises(wp.WanModelError, match="model: .*not a Wan"):
        wp.wan_diffusion_model(_FakePatcher(types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))))


def test_block_swap_streams_blocks_without_changing_the_output(setup, lynx_rope_attention):
    from lynx_core.offload import attach_block_swap

    model, adapters, conditioning, tokens, e, c, freqs = setup
    state = wp.LynxRunState(patch=LynxPatch(adapters, conditioning), blocks=list(model.blocks))
    args = _args(tokens, e, c, freqs, 1, [0])
    with torch.no_grad():
        plain = [wp.LynxBlockPatch(i, state)(args, {"original_block": None})["img"] for i in range(CFG.num_layers)]
        state.swapper = attach_block_swap(state.blocks, CFG.num_layers, "cpu", free_bytes=10**9, pin=False)
        swapped = [wp.LynxBlockPatch(i, state)(args, {"original_block": None})["img"] for i in range(CFG.num_layers)]
    state.release()
    assert state.swapper is None
    for a, b in zip(plain, swapped):
        torch.testing.assert_close(a, b)


def test_blocks_to_swap_is_checked_against_the_model():
    from nodes.sampling import check_blocks_to_swap

    assert check_blocks_to_swap(0, 40) == 0 and check_blocks_to_swap(-1, 40) == -1 and check_blocks_to_swap(12, 40) == 12
    with pytest.raises(ValueError, match="blocks_to_swap=41"):
        check_blocks_to_swap(41, 40)
    with pytest.raises(ValueError, match="blocks_to_swap=-2"):
        check_blocks_to_swap(-2, 40)


# ------------------------------------------------------------------ adapter K/V before the steps
class _FakeSwapper:
    closed = False

    def close(self):
        self.closed = True


@pytest.fixture()
def recorded_swap(monkeypatch):
    """attach_block_swap replaced by a recorder; block swap 'runs' on the CPU for these tests."""
    import lynx_core.offload as offload

    calls = []

    def attach(blocks, count, device, **kw):
        calls.append((count, kw))
        return _FakeSwapper()

    monkeypatch.setattr(offload, "attach_block_swap", attach)
    monkeypatch.setattr(wp.LynxRunState, "_swaps", lambda self, device: bool(self.blocks_to_swap))
    return calls


def test_prepare_run_precomputes_then_plans_swap_with_the_kv_reserved(setup, recorded_swap):
    from lynx_core.offload import DEFAULT_RESERVE_BYTES

    model, adapters, conditioning, *_ = setup
    patch = LynxPatch(adapters, conditioning)
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks), blocks_to_swap=2)
    kv = state.prepare_run(torch.device("cpu"), torch.float32, (1, 16, 2, 4, 4), passes=3)
    assert kv == patch.cache.nbytes() == state.kv_bytes > 0
    assert len(patch.cache._ip) == len(patch.cache._ref) == 2 * CFG.num_layers
    (count, kw), = recorded_swap
    assert count == 2 and kw["borrowed"] is True and kw["rope_bytes"] == 4
    assert kw["reserve_bytes"] == DEFAULT_RESERVE_BYTES + kv
    assert kw["dtype"] == torch.float32  # activations are estimated in the run dtype
    assert all(p.device.type == "cpu" for p in adapters.parameters())
    swapper = state.swapper
    state.release()
    assert swapper.closed and state.swapper is None and state.kv_bytes == 0 and not patch.cache._ip


def test_casts_weights_itself_and_compute_dtype():
    norm = torch.nn.LayerNorm(4)
    assert not wp.casts_weights_itself(norm)
    norm.comfy_cast_weights = True
    assert wp.casts_weights_itself(norm)
    base = types.SimpleNamespace(manual_cast_dtype=torch.float16, get_dtype=lambda: torch.float8_e4m3fn)
    assert wp.compute_dtype(base) == torch.float16
    base.manual_cast_dtype = None
    assert wp.compute_dtype(base) == torch.float8_e4m3fn
    assert wp.compute_dtype(None, [torch.nn.Linear(2, 2).to(torch.bfloat16)]) == torch.bfloat16


@pytest.mark.parametrize("cfg,cfg_id,identities", [(5.0, 2.0, {COND, UNCOND}), (4.0, 1.0, {COND, UNCOND}),
                                                   (1.0, 1.0, {COND})])
def test_guider_precomputes_kv_before_the_first_step(fake_comfy, setup, lynx_rope_attention, cfg, cfg_id, identities):
    model, adapters, conditioning, tokens, e, c, freqs = setup
    patch = LynxPatch(adapters, conditioning)
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks), cond_identities=[COND, UNCOND, COND])
    g = guider_mod.guider_class()(object(), state, cfg=cfg, cfg_id=cfg_id)
    seen = {}

    def first_step(guider):
        seen["keys"] = set(patch.cache._ip) | set(patch.cache._ref)
        entries = {k: v for k, v in patch.cache._ip.items()}
        rows = [0, 1, 2] if len(identities) == 2 else [0]
        with torch.no_grad():
            wp.LynxBlockPatch(1, state)(_args(tokens, e, c, freqs, len(rows), rows), {"original_block": None})
        seen["reused"] = all(patch.cache._ip[k] is v for k, v in entries.items()) and len(patch.cache._ip) == len(entries)
        return "denoised"

    assert g.inner_sample(torch.zeros(1, 16, 2, 4, 4), None, torch.device("cpu"), hook=first_step) == "denoised"
    assert seen["keys"] == {(i, ident) for i in range(CFG.num_layers) for ident in identities}
    assert seen["reused"], "the block patch must read the precomputed keys/values"
    g.outer_sample()
    assert not patch.cache._ip and not patch.cache._ref


def test_guider_detaches_swap_and_releases_kv_when_a_step_is_interrupted(fake_comfy, setup, recorded_swap):
    model, adapters, conditioning, *_ = setup
    patch = LynxPatch(adapters, conditioning)
    state = wp.LynxRunState(patch=patch, blocks=list(model.blocks), blocks_to_swap=-1)
    g = guider_mod.guider_class()(object(), state, cfg=5.0, cfg_id=2.0)

    def interrupted(_guider):
        assert state.swapper is not None and patch.cache._ip
        raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        g.inner_sample(torch.zeros(1, 16, 2, 4, 4), None, torch.device("cpu"), hook=interrupted)
    assert state.swapper is None and recorded_swap[0][0] == "auto"
    with pytest.raises(KeyboardInterrupt):
        g.outer_sample(fail=True)
    assert not patch.cache._ip and not patch.cache._ref and state.kv_bytes == 0


def test_block_swap_refuses_models_with_scheduled_lora_hooks():
    state = wp.LynxRunState(blocks_to_swap=4)
    hooked = types.SimpleNamespace(hook_patches={"hook": {}})
    plain = types.SimpleNamespace(hook_patches={})
    with pytest.raises(ValueError, match="blocks_to_swap: .*set blocks_to_swap to 0"):
        state.check_swap_supported(hooked, "cuda")
    state.check_swap_supported(plain, "cuda")
    state.check_swap_supported(hooked, "cpu")  # nothing is streamed on the CPU
    wp.LynxRunState(blocks_to_swap=0).check_swap_supported(hooked, "cuda")
