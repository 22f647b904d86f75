"""Flow schedule and samplers: official numbers, diffusers parity, known-answer flows, control flow."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lynx_core.sampling import (
    SAMPLERS,
    Interrupted,
    flow_sigmas,
    get_sampler,
    sample_euler,
    sample_unipc,
    shift_sigma,
)

# --------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------


def test_flow_sigmas_official_50_steps():
    sigmas, timesteps = flow_sigmas(50, shift=3.0)
    assert sigmas.dtype == torch.float64 and timesteps.dtype == torch.int64
    assert sigmas.shape == (51,) and timesteps.shape == (50,)
    assert timesteps[:5].tolist() == [999, 992, 985, 978, 971]
    assert timesteps[-5:].tolist() == [249, 206, 160, 111, 57]
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("steps,shift", [(50, 3.0), (7, 3.0), (30, 5.0), (1, 3.0), (13, 1.0)])
def test_flow_sigmas_formula(steps, shift):
    sigmas, timesteps = flow_sigmas(steps, shift=shift)
    # Independent derivation: raw sigmas are (steps-k)/steps·(1-1/T) for k = 0..steps-1.
    k = np.arange(steps)
    raw = (steps - k) / steps * (1 - 1 / 1000)
    expected = shift * raw / (1 + (shift - 1) * raw)
    np.testing.assert_allclose(sigmas[:-1].numpy(), expected, rtol=0, atol=1e-12)
    assert timesteps.tolist() == [int(math.floor(s * 1000)) for s in sigmas[:-1].tolist()]
    assert sigmas[-1].item() == 0.0


def test_flow_sigmas_num_train_timesteps():
    sigmas, timesteps = flow_sigmas(4, shift=1.0, num_train_timesteps=100)
    np.testing.assert_allclose(sigmas.numpy(), [0.99, 0.7425, 0.495, 0.2475, 0.0], atol=1e-12)
    assert timesteps.tolist() == [99, 74, 49, 24]  # truncated: 49.5 and 24.75 would round up


def test_shift_sigma_properties():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0, 5.0):
        out = shift_sigma(s, shift)
        assert out[0].item() == 0.0 and abs(out[-1].item() - 1.0) < 1e-15
        assert bool((out[1:] > out[:-1]).all())
    assert torch.equal(shift_sigma(s, 1.0), s)
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert bool((shift_sigma(s[1:-1], 3.0) > s[1:-1]).all())  # shift > 1 moves toward noise


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "50"])
def test_flow_sigmas_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(bad)


def test_shift_must_be_positive():
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, shift=0.0)


# --------------------------------------------------------------------------------------------
# synthetic velocity models
# --------------------------------------------------------------------------------------------


def _linear_model(dim: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g) / dim**0.5
    b = torch.randn(dim, generator=g)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return 0.5 * (x @ a.T) + math.sin(3.0 * sigma) * b + sigma * x

    return velocity


def _diffusers_unipc(steps: int, shift: float):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
        num_train_timesteps=1000,
        timestep_spacing="linspace",
    )
    sched.set_timesteps(steps)
    ours, _ = flow_sigmas(steps, shift)
    if not torch.allclose(sched.sigmas.double(), ours, atol=1e-6):
        # diffusers after 0.33 starts the raw flow list at σ = 1 instead of 1 − 1/T. Hand it the
        # 0.33.1 raw list (unshifted) so it still applies the shift and truncation itself.
        raw = (1.0 - np.linspace(1.0, 1.0 / 1000, steps + 1))[::-1][:-1].copy()
        sched.set_timesteps(sigmas=raw)
    return sched


@pytest.mark.parametrize("steps", [50, 7, 2])
def test_unipc_matches_diffusers_step_by_step(steps):
    shift = 3.0
    sched = _diffusers_unipc(steps, shift)
    sigmas, timesteps = flow_sigmas(steps, shift)
    assert torch.equal(sched.timesteps.to(torch.int64), timesteps)

    velocity = _linear_model()
    x_init = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))

    ref_traj = []
    x = x_init.clone()
    for k, t in enumerate(sched.timesteps):
        v = velocity(x, float(sigmas[k]))
        x = sched.step(v, t, x).prev_sample
        ref_traj.append(x.clone())

    our_traj = []
    seen_t = []
    out = sample_unipc(
        lambda x, s, t, k: (seen_t.append(int(t.item())), velocity(x, s))[1],
        x_init,
        sigmas,
        timesteps,
        callback=lambda k, n, x, x0: our_traj.append(x.clone()),
    )
    assert seen_t == timesteps.tolist()
    assert out.dtype == torch.float32
    assert len(our_traj) == steps
    for k, (a, b) in enumerate(zip(our_traj, ref_traj)):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, f"step {k}: max abs diff {diff}"
    assert (out - ref_traj[-1]).abs().max().item() <= 1e-5


def test_unipc_corrector_matters():
    """Guard against a silently disabled corrector or wrong order: first-order DDIM differs."""
    velocity = _linear_model()
    sigmas, timesteps = flow_sigmas(10)
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(2))
    unipc = sample_unipc(lambda x, s, t, k: velocity(x, s), x, sigmas, timesteps)
    euler = sample_euler(lambda x, s, t, k: velocity(x, s), x, sigmas, timesteps)
    assert (unipc - euler).abs().max().item() > 1e-3


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [sample_euler, sample_unipc])
def test_perfect_denoiser_lands_on_target(sampler):
    """v = (x − c)/σ is the exact velocity when the clean sample is c: the flow is a straight
    line x_σ = c + (σ/σ0)(x0 − c), which both samplers must follow exactly."""
    g = torch.Generator().manual_seed(3)
    c = torch.randn(4, 5, generator=g)
    x0 = torch.randn(4, 5, generator=g)
    sigmas, timesteps = flow_sigmas(12)
    traj = []
    out = sampler(
        lambda x, s, t, k: (x - c) / s,
        x0,
        sigmas,
        timesteps,
        callback=lambda k, n, x, x0p: traj.append((x.clone(), x0p.clone())),
    )
    torch.testing.assert_close(out, c, atol=1e-5, rtol=0)
    s0 = sigmas[0].item()
    for k, (x, x0_pred) in enumerate(traj):
        expected = c + (sigmas[k + 1].item() / s0) * (x0 - c)
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(x0_pred, c, atol=1e-5, rtol=0)


def _linear_ode(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.3
    x0 = torch.randn(8, generator=g, dtype=torch.float64)

    def exact(sigmas):
        return torch.linalg.matrix_exp(a * (sigmas[-1] - sigmas[0]).item()) @ x0

    return a, x0, exact


def test_euler_converges_first_order():
    a, x0, exact = _linear_ode()
    errors = []
    for steps in (10, 20, 40):
        sigmas, timesteps = flow_sigmas(steps)
        out = sample_euler(lambda x, s, t, k: (x.double() @ a.T).float(), x0.float(), sigmas, timesteps)
        errors.append((out.double() - exact(sigmas)).abs().max().item())
    # first order: halving the step roughly halves the error
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.4 < fine / coarse < 0.65


def test_unipc_more_accurate_than_euler():
    a, x0, exact = _linear_ode()
    for steps in (10, 20):
        sigmas, timesteps = flow_sigmas(steps)
        fn = lambda x, s, t, k: (x.double() @ a.T).float()  # noqa: E731
        ref = exact(sigmas)
        e_euler = (sample_euler(fn, x0.float(), sigmas, timesteps).double() - ref).abs().max().item()
        e_unipc = (sample_unipc(fn, x0.float(), sigmas, timesteps).double() - ref).abs().max().item()
        assert e_unipc < 0.5 * e_euler


# --------------------------------------------------------------------------------------------
# control flow
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_model_fn_arguments_and_callback(name):
    sampler = get_sampler(name)
    sigmas, timesteps = flow_sigmas(6)
    calls = []

    def model_fn(x, sigma, timestep, step_index):
        calls.append((sigma, timestep.clone(), step_index, x.dtype))
        return torch.full_like(x, 0.25)

    seen = []
    out = sampler(
        model_fn,
        torch.zeros(2, 3, dtype=torch.bfloat16),
        sigmas,
        timesteps,
        callback=lambda k, n, x, x0: seen.append((k, n, x.clone(), x0.clone())),
    )
    assert out.dtype == torch.float32
    assert [c[2] for c in calls] == list(range(6))
    for k, (sigma, ts, _, dtype) in enumerate(calls):
        assert isinstance(sigma, float) and sigma == sigmas[k].item()
        assert ts.dtype == torch.int64 and ts.shape == (1,) and ts.item() == timesteps[k].item()
        assert dtype == torch.float32
    assert [(k, n) for k, n, _, _ in seen] == [(k, 6) for k in range(6)]
    assert torch.equal(seen[-1][2], out)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cancel_raises_between_steps_and_leaves_input_alone(name):
    sampler = get_sampler(name)
    sigmas, timesteps = flow_sigmas(8)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    x_copy = x.clone()
    calls = []
    done = []

    def model_fn(x_, sigma, t, k):
        calls.append(k)
        return x_ * 0.1 + 1.0

    with pytest.raises(Interrupted):
        sampler(
            model_fn,
            x,
            sigmas,
            timesteps,
            callback=lambda k, n, x_, x0: done.append(k),
            cancel=lambda: len(calls) == 3,
        )
    assert calls == [0, 1, 2] and done == [0, 1, 2]
    assert torch.equal(x, x_copy)


def test_samplers_do_not_modify_input_in_place():
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(6))
    x_copy = x.clone()
    sigmas, timesteps = flow_sigmas(5)
    for sampler in SAMPLERS.values():
        sampler(lambda x_, s, t, k: x_ + 1.0, x, sigmas, timesteps)
        assert torch.equal(x, x_copy)


def test_get_sampler_errors_list_names():
    assert get_sampler("UniPC") is sample_unipc
    assert get_sampler("euler") is sample_euler
    with pytest.raises(ValueError) as e:
        get_sampler("dpm++")
    assert "euler" in str(e.value) and "unipc" in str(e.value)


def test_schedule_validation():
    x = torch.zeros(2)
    fn = lambda x_, s, t, k: x_  # noqa: E731
    sigmas, timesteps = flow_sigmas(4)
    with pytest.raises(ValueError, match="one entry fewer"):
        sample_unipc(fn, x, sigmas, timesteps[:-1])
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler(fn, x, sigmas.flip(0), timesteps)
    with pytest.raises(ValueError, match="velocity of shape"):
        sample_unipc(lambda x_, s, t, k: x_[:1], x, sigmas, timesteps)


def test_unipc_handles_sigma_one_start():
    """ComfyUI schedules may start at exactly σ = 1 (log-SNR −∞); the result must stay finite
    and the straight-line flow must still be exact."""
    c = torch.randn(6, generator=torch.Generator().manual_seed(7))
    x0 = torch.randn(6, generator=torch.Generator().manual_seed(8))
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    timesteps = torch.tensor([1000, 750, 500, 250])
    out = sample_unipc(lambda x, s, t, k: (x - c) / s, x0, sigmas, timesteps)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, c, atol=1e-5, rtol=0)
