"""``lynx_unipc``: the official Lynx UniPC (lynx_core's ``sample_unipc``) as a ComfyUI sampler.

The official pipeline samples with diffusers 0.33.1's UniPCMultistepScheduler (bh2, order 2,
order 1 on the last step, a last step to σ = 0). ComfyUI's ``uni_pc_bh2`` is another formulation
(a different time variable and corrector schedule), so it does not give the official numbers.
This module hands ComfyUI the engine's own sampler instead, through ComfyUI's KSAMPLER interface:

* ComfyUI's sampler functions get ``model(x, σ)`` returning the denoised x0; the engine sampler
  wants the flow velocity, so the wrapper returns ``v = (x − x0)/σ`` (then ``x − σ·v`` inside the
  sampler is x0 again, up to one float32 rounding).
* The model is called with ComfyUI's own σ tensor, so ComfyUI turns it into the model's
  timestep as for every other sampler; with LynxSampler's ``lynx_official`` schedule the Lynx
  timestep wrapper (nodes/wan_patch.py) then replaces σ·1000 by the official int64 timesteps.
* Any strictly decreasing sigma list within [0, 1] works (every ComfyUI scheduler on a Wan /
  flow model, the tail that ``denoise`` keeps, SplitSigmas halves). When the list ends at σ = 0
  the last step lands on the x0 estimate (as the official run); when it ends above 0 (the first
  half of a split) the last step is first-order and stops at that σ.
* ComfyUI's callback (progress bar, latent preview, the x0 of SamplerCustomAdvanced's
  ``denoised_output``) gets every step's latent and x0 estimate; ComfyUI's interrupt is checked
  before every model call.
"""
from __future__ import annotations

import torch

from lynx_core.sampling.samplers import sample_unipc

LYNX_UNIPC = "lynx_unipc"
CATEGORY = "Lynx/sampling"


def _interrupt_check():
    """ComfyUI raises its own InterruptProcessingException (the queue reports 'interrupted')."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return lambda: False

    def cancel() -> bool:
        mm.throw_exception_if_processing_interrupted()
        return False

    return cancel


def _checked_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    sig = sigmas.detach().flatten()
    s = sig.double().cpu()
    if not torch.isfinite(s).all() or (s < 0).any() or s[0] > 1.0 + 1e-6:
        raise ValueError(
            f"sampler {LYNX_UNIPC}: it samples flow-matching models (Wan), whose sigmas lie in [0, 1]; got "
            f"{[round(float(v), 4) for v in s[:8]]}{'…' if len(s) > 8 else ''}. Use it with a Wan model, or "
            "pick another sampler.")
    if not (s[1:] < s[:-1]).all():
        raise ValueError(
            f"sampler {LYNX_UNIPC}: the sigmas must strictly decrease (got {[round(float(v), 4) for v in s]}); "
            "this scheduler repeats a sigma. Use lynx_official, simple or beta, or fewer steps.")
    return sig


def sample_lynx_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI sampler function (the KSAMPLER signature): official UniPC over ``sigmas``."""
    extra_args = {} if extra_args is None else extra_args
    if sigmas.numel() <= 1:
        return x
    sig = _checked_sigmas(sigmas)
    s_in = x.new_ones([x.shape[0]])
    # sample_unipc wants a timestep per step; ComfyUI computes the real one from σ inside the
    # model call, so these only satisfy the engine's bookkeeping.
    timesteps = (sig[:-1].double() * 1000.0).to(torch.int64).cpu()

    def model_fn(xk: torch.Tensor, sigma: float, _timestep: torch.Tensor, k: int) -> torch.Tensor:
        x0 = model(xk, sig[k] * s_in, **extra_args)
        return (xk - x0.to(xk.dtype)) / sigma

    pbar = _progress(len(sig) - 1, disable)

    def on_step(k: int, _total: int, xk: torch.Tensor, x0: torch.Tensor) -> None:
        if pbar is not None:
            pbar.update(1)
        if callback is not None:
            callback({"x": xk, "i": k, "sigma": sig[k], "sigma_hat": sig[k], "denoised": x0})

    try:
        return sample_unipc(model_fn, x, sig.cpu(), timesteps, callback=on_step, cancel=_interrupt_check())
    finally:
        if pbar is not None:
            pbar.close()


def _progress(total: int, disable):
    if disable:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total)


def lynx_unipc_sampler():
    """A ComfyUI SAMPLER object running :func:`sample_lynx_unipc`."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_lynx_unipc)


class LynxUniPCSampler:
    DESCRIPTION = ("The official Lynx sampler (UniPC as the official pipeline runs it: diffusers 0.33.1, bh2, "
                   "order 2, first order on the last step, last step to sigma 0) as a SAMPLER for "
                   "SamplerCustomAdvanced. ComfyUI's uni_pc_bh2 is a different formulation. Works with any "
                   "decreasing sigma list of a Wan model.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's sampler input.",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def get_sampler(self):
        return (lynx_unipc_sampler(),)
