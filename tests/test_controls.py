"""Sampling controls in the engine: block subsets, per-step schedules, adapter scales folded into the values."""
import pytest
import torch

import lynx_core.pipeline as pipeline
from lynx_core.attention import attention_sdpa
from lynx_core.block import BlockAdapterInputs, wan_block_forward
from lynx_core.controls import Schedule, as_schedule, block_subset, parse_blocks, parse_schedule, step_at_sigma
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.pipeline import GenerationSettings, generate
from lynx_core.sampling.schedule import flow_sigmas
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.rope import apply_rope
from tests.tiny_lynx import tiny_lynx

CFG = WAN_CONFIGS["tiny"]
SHAPE = (1, 16, 2, 4, 6)
SMALL = dict(id_dim=CFG.dim, resampler_dim=32, resampler_heads=2, resampler_dim_head=16, resampler_depth=2)


# ------------------------------------------------------------------ parsing
def test_block_subsets_parse_ranges_indices_spaces_and_repeats():
    assert parse_blocks("", 40, "ip_blocks") is None
    assert parse_blocks("   ", 40, "ip_blocks") is None
    assert parse_blocks("none", 40, "ip_blocks") == frozenset()
    assert parse_blocks(" NONE ", 40, "ip_blocks") == frozenset()
    assert parse_blocks("0-20, 25", 40, "ip_blocks") == frozenset(range(21)) | {25}
    assert parse_blocks(" 3 ,1-2,2 , 3- 4,", 40, "ref_blocks") == frozenset({1, 2, 3, 4})
    assert parse_blocks("39", 40, "ref_blocks") == frozenset({39})
    assert block_subset([0, 2, 2], 4, "ip_blocks") == frozenset({0, 2})
    assert block_subset(None, 4, "ip_blocks") is None


@pytest.mark.parametrize("text,match", [
    ("45", r"^ip_blocks: block 45 is out of range; the model has 40 blocks \(0-39\)$"),
    ("0-40", r"^ip_blocks: block 40 is out of range; the model has 40 blocks \(0-39\)$"),
    ("a", r"^ip_blocks: 'a' is not a block index or range"),
    ("-3", r"^ip_blocks: '-3' is not a block index or range"),
    ("1.5", r"^ip_blocks: '1.5' is not"),
    ("5-2", r"^ip_blocks: the range '5-2' runs backwards; write '2-5'"),
    (",", r"^ip_blocks: no block index"),
    ("0-3 7", r"^ip_blocks: '0-3 7' is not"),
])
def test_bad_block_subsets_name_the_input(text, match):
    with pytest.raises(ValueError, match=match):
        parse_blocks(text, 40, "ip_blocks")


def test_block_subset_lists_are_checked():
    with pytest.raises(ValueError, match=r"ref_blocks: block 4 is out of range; the model has 4 blocks \(0-3\)"):
        block_subset([1, 4], 4, "ref_blocks")
    with pytest.raises(ValueError, match="ref_blocks: True is not a block index"):
        block_subset([True], 4, "ref_blocks")


def test_schedule_lists_and_keyframes():
    assert parse_schedule("", "cfg_schedule") is None
    s = parse_schedule("5, 5, 4.5, 4", "cfg_schedule")
    assert s.per_step and s.values_for(4) == [5.0, 5.0, 4.5, 4.0]
    k = parse_schedule("0:5.0, 0.6:3.0", "cfg_schedule")
    assert not k.per_step and k.first == 5.0
    # held from ceil(fraction * N): N = 5 -> steps 3, 4; N = 10 -> steps 6..9; N = 2 -> step 2 never
    assert k.values_for(5) == [5.0, 5.0, 5.0, 3.0, 3.0]
    assert k.values_for(10) == [5.0] * 6 + [3.0] * 4
    assert k.values_for(2) == [5.0, 5.0]
    assert k.values_for(1) == [5.0]
    # several keyframes, newline separators, a fraction that lands exactly on a step
    m = parse_schedule("0:1\n0.25:2\n0.5:0", "ip_scale_schedule")
    assert m.values_for(4) == [1.0, 2.0, 0.0, 0.0]
    assert m.values_for(8) == [1.0, 1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    assert as_schedule([1, 2.5], "x").values == (1.0, 2.5)
    assert as_schedule([], "x") is None and as_schedule(None, "x") is None and as_schedule(" ", "x") is None
    assert as_schedule(s, "x") is s


@pytest.mark.parametrize("text,match", [
    ("5, x", r"^cfg_schedule: 'x' is not a number"),
    ("0:5, 3", r"^cfg_schedule: mixes keyframes"),
    ("0.2:5, 0.6:3", r"^cfg_schedule: the first keyframe must be at 0"),
    ("0:5, 0.6:3, 0.4:2", r"^cfg_schedule: keyframe '0.4:2' does not come after 0.6"),
    ("0:5, 0.6:3, 0.6:2", r"^cfg_schedule: keyframe '0.6:2' does not come after 0.6"),
    ("0:5, 1:3", r"^cfg_schedule: keyframe '1:3' starts at 1, outside 0 to below 1"),
    ("0:5, a:3", r"^cfg_schedule: 'a' in 'a:3' is not a fraction"),
    ("0:5, 0.5:", r"^cfg_schedule: '' is not a number"),
    ("5, -1", r"^cfg_schedule: '-1' is below 0"),
    ("5, nan", r"^cfg_schedule: 'nan' is not a finite number"),
])
def test_bad_schedules_name_the_input(text, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(text, "cfg_schedule")


def test_schedule_count_must_equal_the_steps():
    s = parse_schedule("5, 5, 4.5, 4", "cfg_schedule")
    s.check_steps(4)
    with pytest.raises(ValueError, match=r"^cfg_schedule: 4 values for 6 steps; give exactly one value per step \(6\)"):
        s.check_steps(6)
    with pytest.raises(ValueError, match="cfg_schedule: 4 values for 3 steps"):
        s.value_at(0, 3)
    parse_schedule("0:5, 0.5:2", "cfg_schedule").check_steps(1000)  # keyframes fit any count
    with pytest.raises(ValueError, match="cfg_id_schedule: 2 values for 4 steps"):
        GenerationSettings(steps=4, cfg_id_schedule="3, 2").resolved(None)


def test_step_at_sigma_follows_the_window_rule():
    sig, _ = flow_sigmas(6, 3.0)
    s = [float(v) for v in sig.float()]
    assert [step_at_sigma(s[k], s) for k in range(6)] == list(range(6))
    # evaluations inside a step (between its sigma and the next one) belong to that step
    assert [step_at_sigma((s[k] + s[k + 1]) / 2, s) for k in range(6)] == list(range(6))
    assert step_at_sigma(s[0] + 0.1, s) == 0 and step_at_sigma(0.0, s) == 5


# ------------------------------------------------------------------ engine runs
@pytest.fixture(scope="module")
def parts():
    t = tiny_lynx()
    return t.model, t.adapters, t.prompt, t.negative, make_conditioning(t.adapters, t.emb, t.ref_cond, t.ref_uncond)


_RUNS: dict = {}


def _run(parts, patch=True, callback=None, **kw):
    """One generation; repeated plain runs (no callback) come from a cache (generation is deterministic)."""
    key = (patch, repr(sorted(kw.items())))
    if callback is None and key in _RUNS:
        return _RUNS[key]
    out = _generate(parts, patch, callback, **kw)
    if callback is None:
        _RUNS[key] = out
    return out


def _generate(parts, patch, callback, **kw):
    model, full, prompt, negative, cond = parts
    base = dict(seed=7, steps=4, sampler="unipc", ip_scale=0.8, ref_scale=1.3)
    base.update(kw)
    return generate(model, prompt, negative, SHAPE, GenerationSettings(**base),
                    LynxPatch(full, cond) if patch else None, callback=callback)


def test_tiny_model_has_several_blocks():
    assert CFG.num_layers >= 2  # the subset tests need a block inside and one outside


def test_empty_controls_equal_todays_output_bit_for_bit(parts):
    today = _run(parts)
    empty = _run(parts, ip_blocks="", ref_blocks="", cfg_schedule="", cfg_id_schedule="",
                 ip_scale_schedule="", ref_scale_schedule="")
    assert torch.equal(today, empty)
    everything = _run(parts, ip_blocks=f"0-{CFG.num_layers - 1}", ref_blocks=list(range(CFG.num_layers)))
    assert torch.equal(today, everything)


def test_subsets_excluding_every_block_equal_plain_wan_bit_for_bit(parts):
    plain = _run(parts, patch=False, ip_scale=None, ref_scale=None)
    none = _run(parts, ip_blocks="none", ref_blocks="none")
    assert torch.equal(plain, none)
    assert not torch.equal(plain, _run(parts))


def test_a_subset_only_affects_its_blocks(parts):
    model, full, prompt, negative, cond = parts
    patch = LynxPatch(full, cond, ip_scale=0.8, ref_scale=1.3, ip_blocks="1", ref_blocks="0")
    got = {i: patch.block_inputs(i, model.blocks[i], [COND], torch.device("cpu"), torch.float32)
           for i in range(CFG.num_layers)}
    assert got[0].ip is None and got[0].ref is not None
    assert got[1].ip is not None and got[1].ref is None
    assert all(got[i] is None for i in range(2, CFG.num_layers))
    # Precompute skips the keys/values of blocks outside the subsets (memory).
    patch.release()
    patch.precompute(list(model.blocks), torch.device("cpu"), torch.float32)
    assert set(patch.cache._ip) == {(1, COND), (1, UNCOND)}
    assert set(patch.cache._ref) == {(0, COND), (0, UNCOND)}

    # Per block: inside the subset the block output changes, outside it is the plain block.
    x = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        tokens, _grid, e, _temb, ctx, freqs = model.embed(x, torch.tensor([500]), prompt)
        for i in range(CFG.num_layers):
            blk = model.blocks[i]
            plain = wan_block_forward(blk, tokens, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa)
            inputs = patch.block_inputs(i, blk, [COND], tokens.device, tokens.dtype)
            out = wan_block_forward(blk, tokens, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa,
                                    adapters=inputs)
            assert torch.equal(out, plain) == (i >= 2), i


def test_subset_of_one_branch_matches_zeroing_that_branch_elsewhere(parts):
    """ip on block 0 only: block 0 as with the full patch's ip, other blocks with ref only."""
    model, full, prompt, negative, cond = parts
    sub = LynxPatch(full, cond, ip_scale=0.8, ref_scale=1.3, ip_blocks=[0])
    whole = LynxPatch(full, cond, ip_scale=0.8, ref_scale=1.3)
    dev, dt = torch.device("cpu"), torch.float32
    a = sub.block_inputs(0, model.blocks[0], [COND], dev, dt)
    b = whole.block_inputs(0, model.blocks[0], [COND], dev, dt)
    assert torch.equal(a.ip[1], b.ip[1]) and torch.equal(a.ref[1], b.ref[1])
    c = sub.block_inputs(1, model.blocks[1], [COND], dev, dt)
    assert c.ip is None and torch.equal(c.ref[1], whole.block_inputs(1, model.blocks[1], [COND], dev, dt).ref[1])


def test_schedules_equal_to_constants_give_todays_numbers_bit_for_bit(parts):
    today = _run(parts, cfg=4.0, cfg_id=2.5)
    lists = _run(parts, cfg=4.0, cfg_id=2.5, cfg_schedule="4, 4, 4, 4", cfg_id_schedule=[2.5] * 4,
                 ip_scale_schedule="0.8,0.8,0.8,0.8", ref_scale_schedule=[1.3, 1.3, 1.3, 1.3])
    keys = _run(parts, cfg=1.0, cfg_id=0.0, cfg_schedule="0:4", cfg_id_schedule="0:2.5, 0.5:2.5",
                ip_scale=0.0, ref_scale=0.0, ip_scale_schedule="0:0.8", ref_scale_schedule="0:1.3")
    assert torch.equal(today, lists)
    assert torch.equal(today, keys)


_TRAJECTORIES: dict = {}


def _trajectory(parts, **kw):
    key = repr(sorted(kw.items()))
    if key not in _TRAJECTORIES:
        xs = []
        _run(parts, callback=lambda k, n, x, x0: xs.append(x.clone()), **kw)
        _TRAJECTORIES[key] = xs
    return _TRAJECTORIES[key]


@pytest.mark.parametrize("kw", [
    dict(cfg_schedule="0:5, 0.5:3"),
    dict(cfg_id_schedule="2, 2, 1, 1"),        # three passes, then two passes from step 2
    dict(ip_scale_schedule="0:0.8, 0.5:0.3"),
    dict(ref_scale_schedule="1.3, 1.3, 0, 0"),  # the branch switches off from step 2
])
def test_a_schedule_changing_at_step_k_changes_only_steps_from_k(parts, kw):
    base = _trajectory(parts, cfg=5.0, cfg_id=2.0)
    changed = _trajectory(parts, cfg=5.0, cfg_id=2.0, **kw)
    assert len(base) == len(changed) == 4
    for k in range(2):
        assert torch.equal(base[k], changed[k]), k
    assert not torch.allclose(base[2], changed[2])


def test_cfg_id_schedule_switches_the_number_of_passes_per_step(parts, monkeypatch):
    calls = []
    real = pipeline.predict

    def counting(model, x, timestep, context, patch, identity, block_runner=None):
        calls.append(identity)
        return real(model, x, timestep, context, patch, identity, block_runner)

    monkeypatch.setattr(pipeline, "predict", counting)
    per_step = []
    _run(parts, sampler="euler", batch_passes=False, cfg_id_schedule="0:2, 0.5:1", cfg_schedule="5, 5, 5, 1",
         callback=lambda k, n, x, x0: (per_step.append(len(calls)), calls.clear()))
    assert per_step == [3, 3, 2, 1]


def test_window_composes_with_scale_schedules(parts):
    """Outside start/end the adapters are off whatever the schedule says."""
    plain = _run(parts, patch=False, ip_scale=None, ref_scale=None)
    off = _run(parts, start_percent=0.5, end_percent=0.5, ip_scale_schedule="0:2", ref_scale_schedule="1,1,1,1")
    assert torch.equal(plain, off)


def test_the_patch_keeps_its_own_controls_after_a_generation(parts):
    model, full, prompt, negative, cond = parts
    patch = LynxPatch(full, cond, ip_blocks="0", ip_scale_schedule="0:0.5")
    generate(model, prompt, negative, SHAPE, GenerationSettings(seed=1, steps=2, sampler="euler", ip_blocks="",
                                                                ip_scale_schedule="1, 2"), patch)
    assert patch.ip_blocks == frozenset({0}) and patch.ip_scale_schedule.values == (0.5,) and patch.step is None
    with pytest.raises(ValueError, match="ip_scale_schedule: 2 values for 3 steps"):
        generate(model, prompt, negative, SHAPE, GenerationSettings(seed=1, steps=3, sampler="euler"),
                 LynxPatch(full, cond, ip_scale_schedule=[1, 2]))


# ------------------------------------------------------------------ scales folded into the values
def test_block_gets_scaled_values_and_a_scale_of_one(parts):
    model, full, prompt, negative, cond = parts
    patch = LynxPatch(full, cond, ip_scale=0.8, ref_scale=1.3)
    dev, dt = torch.device("cpu"), torch.float32
    a = patch.block_inputs(0, model.blocks[0], [COND, UNCOND], dev, dt)
    assert a.ip_scale == 1.0 and a.ref_scale == 1.0
    k_ip, v_ip = patch.cache.ip_kv(0, model.blocks[0], COND, dev, dt)
    torch.testing.assert_close(a.ip[1][0:1], v_ip * 0.8, rtol=0, atol=0)
    assert torch.equal(a.ip[0][0:1], k_ip)  # keys are not scaled
    # the cache keeps the unscaled values; a constant scale multiplies once
    assert torch.equal(patch.cache.ip_kv(0, model.blocks[0], COND, dev, dt)[1], v_ip)
    b = patch.block_inputs(0, model.blocks[0], [COND], dev, dt)
    assert b.ip[1] is patch.block_inputs(0, model.blocks[0], [COND], dev, dt).ip[1]
    # scale 1.0: the cached tensors themselves, no copy
    one = LynxPatch(full, cond)
    c = one.block_inputs(0, model.blocks[0], [COND], dev, dt)
    assert c.ip[1] is one.cache.ip_kv(0, model.blocks[0], COND, dev, dt)[1]
    # a schedule that changes the scale gives a new copy for the new value
    sched = LynxPatch(full, cond, ip_scale_schedule="0.5, 2")
    sched.set_step(0, 2)
    first = sched.block_inputs(0, model.blocks[0], [COND], dev, dt).ip[1]
    sched.set_step(1, 2)
    second = sched.block_inputs(0, model.blocks[0], [COND], dev, dt).ip[1]
    torch.testing.assert_close(second, first * 4.0)


def test_folded_scales_match_the_block_formula(parts):
    """(K, s·V) with scale 1 equals the block's own scaled branch (unscaled values, scale s)."""
    model, full, prompt, negative, cond = parts
    patch = LynxPatch(full, cond, ip_scale=0.6, ref_scale=1.7)
    dev, dt = torch.device("cpu"), torch.float32
    x = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        tokens, _grid, e, _temb, ctx, freqs = model.embed(x, torch.tensor([500]), prompt)
        blk = model.blocks[1]
        folded = wan_block_forward(blk, tokens, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa,
                                   adapters=patch.block_inputs(1, blk, [COND], dev, dt))
        unscaled = BlockAdapterInputs(ip=patch.cache.ip_kv(1, blk, COND, dev, dt),
                                      ref=patch.cache.ref_kv(1, blk, COND, dev, dt), ip_scale=0.6, ref_scale=1.7)
        formula = wan_block_forward(blk, tokens, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa,
                                    adapters=unscaled)
    # attention(q, k, s·v) = s·attention(q, k, v) up to fp32 rounding (relative to the output's size)
    assert float((folded - formula).abs().max() / formula.abs().max()) < 1e-5
    assert not torch.equal(folded, wan_block_forward(blk, tokens, e, freqs, ctx, rope=apply_rope,
                                                     attention=attention_sdpa))


def test_precompute_scales_for_the_first_step_and_counts_the_copies(parts):
    model, full, prompt, negative, cond = parts
    dev, dt = torch.device("cpu"), torch.float32
    one = LynxPatch(full, cond)
    scaled = LynxPatch(full, cond, ip_scale=0.8, ref_scale=1.0)
    n_one = one.precompute(list(model.blocks), dev, dt)
    n_scaled = scaled.precompute(list(model.blocks), dev, dt)
    v_bytes = sum(v.numel() * v.element_size() for k, v in (e for e in scaled.cache._ip.values()))
    assert n_scaled == n_one + v_bytes  # one scaled copy of each ID value, none for ref (scale 1)
    seen = scaled.block_inputs(0, model.blocks[0], [COND], dev, dt).ip[1]
    assert seen is scaled.cache._scaled[("ip", 0, COND)][2][1]  # the step reads the precomputed copy
    # a schedule that starts at 0 precomputes the keys/values (later steps need them) without a copy
    late = LynxPatch(full, cond, ip_scale=0.0, ip_scale_schedule="0:0, 0.5:1", ref_scale=0.0)
    late.precompute(list(model.blocks), dev, dt)
    assert len(late.cache._ip) == 2 * CFG.num_layers and not late.cache._ref and not late.cache._scaled
    late.set_step(0, 4)
    assert late.block_inputs(0, model.blocks[0], [COND], dev, dt) is None
    late.set_step(2, 4)
    assert late.block_inputs(0, model.blocks[0], [COND], dev, dt).ip is not None


def test_schedule_type_is_exported():
    assert isinstance(parse_schedule("1", "x"), Schedule)
