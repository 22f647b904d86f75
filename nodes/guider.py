"""The Lynx guider: ComfyUI's CFGGuider with the three-pass identity guidance of the spec.

Passes and identities (``lynx_core.guidance``): ``c`` = positive text with the face,
``u`` = negative text without identity, ``i`` = negative text with the face. The guider hands
ComfyUI's ``calc_cond_batch`` the cond list ``[positive, negative, negative]`` and records which
identity each list index carries (``[COND, UNCOND, COND]``). ComfyUI batches those conds into
model calls and reports, per call, ``transformer_options["cond_or_uncond"]`` (the list index of
every chunk of rows); the block patches turn that into per-row identities. Two-pass mode uses
``[positive, negative]`` → ``[COND, UNCOND]`` and ComfyUI's own ``cfg_function`` (so CFG
post-processing nodes keep working); cfg ≤ 1 runs the positive pass alone.

The ``i`` pass evaluates the negative conds a second time, as copies with their own ``uuid``:
ComfyUI reports ``transformer_options["uuids"]`` per chunk and caches keyed by it (EasyCache)
would otherwise store and replay one entry for both the ``u`` and the ``i`` rows.

ComfyUI's model calls return denoised predictions x0 = x − σ·v. The three weights
(1 − g_i, g_i − g, g) sum to 1, so combining the x0s gives exactly x − σ·(combined v): the spec's
velocity formula.
"""
from __future__ import annotations

import logging
import uuid

from lynx_core.guidance import combine_three_pass, guidance_mode
from lynx_core.lynx import COND, IDENTITIES, UNCOND

from .wan_patch import LynxRunState, compute_dtype

log = logging.getLogger(__name__)

_CLASS = None


def image_only_conds(negative: list | None) -> list | None:
    """The negative conds for the ``i`` pass: the same entries, each with a fresh ``uuid``."""
    if negative is None:
        return None
    return [dict(c, uuid=uuid.uuid4()) if isinstance(c, dict) else c for c in negative]


def guider_class():
    """The CFGGuider subclass (built on first use, so importing this module needs no ComfyUI)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import comfy.samplers

    class LynxCFGGuider(comfy.samplers.CFGGuider):
        def __init__(self, model_patcher, state: LynxRunState, cfg: float, cfg_id: float):
            super().__init__(model_patcher)
            self.state = state
            self.cfg = float(cfg)
            self.cfg_id = float(cfg_id)
            self._neg_i: tuple[list, list] | None = None  # (negative conds of this run, their i-pass copies)

        def set_cfg_id(self, cfg_id: float) -> None:
            self.cfg_id = float(cfg_id)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            st = self.state
            sample_sigmas = (model_options.get("transformer_options") or {}).get("sample_sigmas")
            st.update_window(float(timestep.flatten()[0]), sample_sigmas)
            positive = self.conds.get("positive", None)
            negative = self.conds.get("negative", None)
            mode = guidance_mode(self.cfg, self.cfg_id)
            if mode == "three_pass":
                st.cond_identities = [COND, UNCOND, COND]
                c, u, i = comfy.samplers.calc_cond_batch(
                    self.inner_model, [positive, negative, self._image_only(negative)], x, timestep, model_options)
                out = combine_three_pass(u, i, c, self.cfg, self.cfg_id)
                for fn in model_options.get("sampler_post_cfg_function", []):
                    out = fn({"denoised": out, "cond": positive, "uncond": negative, "cond_scale": self.cfg,
                              "model": self.inner_model, "uncond_denoised": u, "cond_denoised": c,
                              "sigma": timestep, "model_options": model_options, "input": x})
                return out
            if mode == "two_pass":
                st.cond_identities = [COND, UNCOND]
                c, u = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative], x, timestep, model_options)
                return comfy.samplers.cfg_function(self.inner_model, c, u, self.cfg, x, timestep,
                                                   model_options=model_options, cond=positive, uncond=negative)
            st.cond_identities = [COND]
            (c,) = comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, timestep, model_options)
            return c

        def _image_only(self, negative):
            # Made once per run (ComfyUI keeps the same cond list for every step), so the uuids
            # stay stable across steps as step caches expect.
            if self._neg_i is None or self._neg_i[0] is not negative:
                self._neg_i = (negative, image_only_conds(negative))
            return self._neg_i[1]

        def inner_sample(self, noise, latent_image, device, *args, **kwargs):
            # ComfyUI has loaded the diffusion model (LoRA-patched weights on the device, or layers
            # that cast on forward), not the adapters: their keys/values are computed now, once,
            # before the first step, and block swap then streams what should not stay resident.
            mode = guidance_mode(self.cfg, self.cfg_id)
            passes = {"three_pass": 3, "two_pass": 2}.get(mode, 1)
            identities = IDENTITIES if passes > 1 else (COND,)
            st = self.state
            st.check_swap_supported(self.model_patcher, device)
            try:
                st.prepare_run(device, compute_dtype(getattr(self, "inner_model", None), st.blocks),
                               tuple(noise.shape), passes, identities)
                return super().inner_sample(noise, latent_image, device, *args, **kwargs)
            finally:
                st.detach_swap()

        def outer_sample(self, *args, **kwargs):
            # Interrupt, OOM or success: the cached adapter keys/values never outlive the run, and
            # the patched model stays usable for the next prompt.
            try:
                return super().outer_sample(*args, **kwargs)
            finally:
                self._neg_i = None
                self.state.release()

    _CLASS = LynxCFGGuider
    return _CLASS
