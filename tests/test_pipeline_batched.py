"""Standalone pipeline: the step's passes (c, u, i) batched into one forward equal the separate
forwards (fp32, 1e-5), for three- and two-pass guidance, texts of different lengths, without a
patch, and under block swap, where each swapped block is then loaded once per step, not per pass."""
from __future__ import annotations

import pytest
import torch

from lynx_core import pipeline
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.offload import BlockSwapper, plan_block_swap
from lynx_core.pipeline import GenerationSettings, generate, predict, predict_batched, should_batch_passes
from tests.tiny_lynx import CFG, SHAPE, tiny_lynx



@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def parts():
    t = tiny_lynx(resampler_depth=1)
    # a negative prompt shorter than the positive one: rows whose texts cannot simply be stacked
    short_negative = torch.randn(1, 3, CFG.text_dim, generator=torch.Generator().manual_seed(4))
    return t.model, t.adapters, t.prompt, t.negative, short_negative, t.emb, (t.ref_cond, t.ref_uncond)


def _patch(parts):
    model, adapters, *_rest, emb, refs = parts
    return LynxPatch(adapters, make_conditioning(adapters, emb, *refs), ip_scale=0.8, ref_scale=1.2)


def _run(parts, batch, negative=None, patch=True, **kw):
    model, _a, prompt, neg, *_ = parts
    settings = GenerationSettings(seed=5, steps=3, sampler="euler", batch_passes=batch, **kw)
    with torch.no_grad():
        return generate(model, prompt, neg if negative is None else negative, SHAPE, settings,
                        _patch(parts) if patch else None)


@pytest.mark.parametrize("case", ["three_pass", "two_pass", "no_patch", "texts_of_different_lengths"])
def test_batched_passes_equal_separate_forwards(parts, case):
    kw = {"three_pass": {}, "two_pass": {"cfg_id": 0.0}, "no_patch": {"patch": False},
          "texts_of_different_lengths": {"negative": parts[4]}}[case]
    seq = _run(parts, False, **kw)
    bat = _run(parts, True, **kw)
    assert torch.isfinite(bat).all()
    assert (bat - seq).abs().max().item() <= 1e-5
    if case == "three_pass":
        # The check has teeth: the identity pass matters at this size.
        assert (seq - _run(parts, False, cfg_id=0.0)).abs().max().item() > 1e-3


def test_one_batched_row_is_the_separate_pass_bit_for_bit(parts):
    model, _a, prompt, negative, *_ = parts
    patch = _patch(parts)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([700.0])
    with torch.no_grad():
        (row,) = predict_batched(model, x, t, [model.embed_text(negative)], patch, [UNCOND])
        alone = predict(model, x, t, negative, patch, UNCOND)
        rows = predict_batched(model, x, t, [model.embed_text(c) for c in (prompt, negative, negative)],
                               patch, [COND, UNCOND, COND])
    assert torch.equal(row, alone)
    # the rows keep their identities: u and i share the text, so they differ only by the face
    assert (rows[1] - rows[2]).abs().max().item() > 1e-4
    assert (rows[1] - alone).abs().max().item() <= 1e-5


def test_auto_batches_on_the_host_and_always_under_block_swap(parts):
    model = parts[0]
    assert should_batch_passes(None, model, 3, SHAPE, torch.float32, "cpu", block_swap=False)
    assert should_batch_passes(None, model, 3, SHAPE, torch.float32, "meta", block_swap=True)
    assert not should_batch_passes(None, model, 3, SHAPE, torch.float32, "meta", block_swap=False)
    assert not should_batch_passes(None, model, 1, SHAPE, torch.float32, "cpu", block_swap=True)
    assert not should_batch_passes(False, model, 3, SHAPE, torch.float32, "cpu", block_swap=True)
    assert not should_batch_passes(None, model, 3, (2, *SHAPE[1:]), torch.float32, "cpu", block_swap=True)


def test_settings_decide_between_one_forward_and_three(parts, monkeypatch):
    calls = {"batched": 0, "single": 0}
    real_b, real_s = pipeline.predict_batched, pipeline.predict

    def spy_b(*a, **k):
        calls["batched"] += 1
        return real_b(*a, **k)

    def spy_s(*a, **k):
        calls["single"] += 1
        return real_s(*a, **k)

    monkeypatch.setattr(pipeline, "predict_batched", spy_b)
    monkeypatch.setattr(pipeline, "predict", spy_s)
    _run(parts, None)  # auto on the host: batched
    assert calls == {"batched": 3, "single": 0}
    _run(parts, False)
    assert calls == {"batched": 3, "single": 9}


def test_block_swap_loads_each_swapped_block_once_per_step(parts):
    model, _a, prompt, negative, *_ = parts
    steps = 3
    results, loads = {}, {}
    reference = _run(parts, False)
    for batch in (False, None):
        plan = plan_block_swap(model.blocks, 3, "cpu", ring_size=2)
        with BlockSwapper(model.blocks, plan) as swapper:
            settings = GenerationSettings(seed=5, steps=steps, sampler="euler", batch_passes=batch)
            with torch.no_grad():
                results[batch] = generate(model, prompt, negative, SHAPE, settings, _patch(parts),
                                          block_runner=swapper.block_runner(model))
            loads[batch] = swapper.loads
    assert torch.equal(results[False], reference)
    assert (results[None] - reference).abs().max().item() <= 1e-5
    # auto under block swap batches: each of the 3 swapped blocks crosses once per step (plus one
    # prefetch for a next forward), the separate passes move every one of them three times per step
    assert loads[None] <= steps * 3 + 1
    assert loads[False] >= 3 * steps * 3


@pytest.mark.parametrize("free_gib,fits", [(64, True), (0.0001, False)])
def test_batching_on_cuda_follows_the_free_memory(parts, monkeypatch, free_gib, fits):
    from lynx_core.pipeline import batch_fits

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(free_gib * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 0)
    latent = (1, 16, 21, 60, 104)  # 480x832x81 on the tiny model: 32,760 tokens of width 64
    assert batch_fits(parts[0], 3, latent, torch.bfloat16, "cuda") is fits
    assert should_batch_passes(None, parts[0], 3, latent, torch.bfloat16, "cuda", block_swap=False) is fits
    assert should_batch_passes(None, parts[0], 3, latent, torch.bfloat16, "cuda", block_swap=True)
