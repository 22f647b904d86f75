"""lynx_unipc (nodes/unipc.py) and LynxSampler's denoise schedule (nodes/denoise.py), without ComfyUI.

ComfyUI hands a sampler function ``model(x, σ)`` returning x0; the wrapper turns it into the
velocity the engine's ``sample_unipc`` takes. On a toy velocity model the wrapped run must equal the
engine's own run (the official UniPC), whatever the sigma list.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from lynx_core.sampling.samplers import sample_unipc
from lynx_core.sampling.schedule import flow_sigmas
from nodes.denoise import check_denoise, comfy_tail, official_tail, schedule_steps
from nodes.unipc import LYNX_UNIPC, LynxUniPCSampler, sample_lynx_unipc


def toy_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear 'velocity' that depends on σ (so the sigma each call gets matters)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.tanh(1.3 * x) * (0.5 + s) - 0.3 * x.roll(1, dims=-1) + 0.1 * s


class X0Model:
    """What ComfyUI's sampler functions call: model(x, σ·s_in) -> denoised x0 = x − σ·v."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, sigma, **extra):
        assert sigma.shape == (x.shape[0],)
        self.calls.append(sigma.clone())
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return x - s * toy_velocity(x, sigma)


def engine_run(x, sigmas64):
    def v_fn(xk, sigma, timestep, k):
        return toy_velocity(xk, torch.full((xk.shape[0],), sigma, dtype=torch.float32))
    ts = (sigmas64[:-1] * 1000).to(torch.int64)
    return sample_unipc(v_fn, x, sigmas64, ts)


@pytest.fixture()
def x():
    return torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sigmas", [
    flow_sigmas(6, 3.0)[0],                                   # the official list
    torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=torch.float64),   # ComfyUI 'simple'-like, starts at σ = 1
    official_tail(4, 3.0, 0.5)[0],                            # what denoise 0.5 keeps
    torch.tensor([0.9, 0.6, 0.35], dtype=torch.float64),      # first half of a SplitSigmas: ends above 0
])
def test_x0_wrapper_equals_the_engine_sampler(x, sigmas):
    model = X0Model()
    got = sample_lynx_unipc(model, x.clone(), sigmas.to(torch.float32), extra_args={}, callback=None, disable=True)
    want = engine_run(x.clone(), sigmas.to(torch.float32).double())
    # One float32 rounding per step from x0 → v → x0.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # One model call per step, each at that step's σ (ComfyUI turns it into the timestep), never at σ = 0.
    assert torch.stack([c[0] for c in model.calls]).tolist() == pytest.approx(sigmas[:-1].tolist(), abs=1e-7)
    assert not torch.equal(got, x)


def test_callback_gets_comfyui_step_dicts(x):
    sigmas = flow_sigmas(3, 3.0)[0].to(torch.float32)
    seen = []
    out = sample_lynx_unipc(X0Model(), x, sigmas, extra_args={}, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == [0, 1, 2]
    assert all(set(d) >= {"x", "i", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert float(seen[1]["sigma"]) == pytest.approx(float(sigmas[1]))
    # The last step ends at σ = 0 on the x0 estimate of that step (the official final step).
    torch.testing.assert_close(out, seen[-1]["denoised"])


def test_extra_args_reach_the_model(x):
    got = {}

    def model(xk, sigma, **extra):
        got.update(extra)
        return xk * 0.5

    sample_lynx_unipc(model, x, flow_sigmas(2)[0].float(), extra_args={"model_options": {"k": 1}, "seed": 5},
                      callback=None, disable=True)
    assert got == {"model_options": {"k": 1}, "seed": 5}


def test_comfyui_interrupt_is_raised_before_a_model_call(x, monkeypatch):
    class Interrupt(Exception):
        pass

    calls = []
    mm = types.ModuleType("comfy.model_management")

    def throw():
        if len(calls) >= 2:
            raise Interrupt()
    mm.throw_exception_if_processing_interrupted = throw
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)

    def model(xk, sigma, **extra):
        calls.append(1)
        return xk * 0.9

    before = x.clone()
    with pytest.raises(Interrupt):
        sample_lynx_unipc(model, x, flow_sigmas(5)[0].float(), extra_args={}, callback=None, disable=True)
    assert len(calls) == 2 and torch.equal(x, before), "stops before the 3rd call; the input is untouched"


def test_bad_sigmas_name_the_sampler(x):
    with pytest.raises(ValueError, match="lynx_unipc.*flow-matching.*\\[0, 1\\]"):
        sample_lynx_unipc(X0Model(), x, torch.tensor([14.6, 3.0, 0.0]), extra_args={})
    with pytest.raises(ValueError, match="lynx_unipc.*strictly decrease"):
        sample_lynx_unipc(X0Model(), x, torch.tensor([0.9, 0.5, 0.5, 0.0]), extra_args={})
    assert sample_lynx_unipc(X0Model(), x, torch.tensor([0.5]), extra_args={}) is x


def test_sampler_node_returns_a_ksampler(monkeypatch):
    class KSAMPLER:
        def __init__(self, fn, extra_options={}, inpaint_options={}):
            self.fn = fn
    samplers = types.SimpleNamespace(KSAMPLER=KSAMPLER)
    comfy = types.ModuleType("comfy")
    comfy.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    (s,) = LynxUniPCSampler().get_sampler()
    assert isinstance(s, KSAMPLER) and s.fn is sample_lynx_unipc
    assert LynxUniPCSampler.RETURN_TYPES == ("SAMPLER",) and LynxUniPCSampler.CATEGORY == "Lynx/sampling"


def test_lynx_sampler_offers_lynx_unipc_by_default():
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from nodes.sampling import LynxSampler

    req = LynxSampler.INPUT_TYPES()["required"]
    names, opts = req["sampler_name"]
    assert names[0] == LYNX_UNIPC and opts["default"] == LYNX_UNIPC and "uni_pc_bh2" in names
    assert NODE_CLASS_MAPPINGS["LynxUniPCSampler"] is LynxUniPCSampler
    assert NODE_DISPLAY_NAME_MAPPINGS["LynxUniPCSampler"] == "Lynx UniPC Sampler (official)"
    opt = LynxSampler.INPUT_TYPES()["optional"]
    assert list(opt)[:2] == ["reference", "denoise"]
    assert opt["denoise"][0] == "FLOAT" and opt["denoise"][1]["default"] == 1.0
    assert (opt["denoise"][1]["min"], opt["denoise"][1]["max"]) == (0.0, 1.0)


# ------------------------------------------------------------------ denoise schedule
def test_denoise_one_is_the_whole_official_schedule():
    for steps in (1, 4, 50):
        sig, ts = official_tail(steps, 3.0, 1.0)
        want_sig, want_ts = flow_sigmas(steps, 3.0)
        assert torch.equal(sig, want_sig) and torch.equal(ts, want_ts)


@pytest.mark.parametrize("steps,denoise,total", [(10, 0.5, 20), (7, 0.14, 50), (3, 0.7, 4), (5, 0.3, 17)])
def test_denoise_keeps_the_tail_of_a_longer_official_schedule(steps, denoise, total):
    assert schedule_steps(steps, denoise) == total
    sig, ts = official_tail(steps, 3.0, denoise)
    full_sig, full_ts = flow_sigmas(total, 3.0)
    assert len(sig) == steps + 1 and len(ts) == steps
    assert torch.equal(sig, full_sig[-(steps + 1):]) and torch.equal(ts, full_ts[-steps:])
    assert sig[-1] == 0 and sig[0] < full_sig[0]


def test_comfy_tail_is_ksamplers_rule():
    full = lambda n: torch.linspace(1.0, 0.0, n + 1)  # noqa: E731
    assert torch.equal(comfy_tail(full, 4, 1.0), full(4))
    assert torch.equal(comfy_tail(full, 4, 0.99995), full(4))
    assert torch.equal(comfy_tail(full, 4, 0.3), full(13)[-5:])  # int(4 / 0.3) = 13, as KSampler.set_steps


@pytest.mark.parametrize("bad,match", [(0.0, "denoise: 0 would run no step"), (1.5, "denoise: 1.5 is outside 0..1"),
                                       (-0.1, "outside 0..1"), ("x", "denoise: expected a number"),
                                       (float("nan"), "outside 0..1")])
def test_denoise_errors_name_the_input(bad, match):
    with pytest.raises(ValueError, match=match):
        check_denoise(bad)
    assert check_denoise(1) == 1.0 and check_denoise(0.25) == 0.25
