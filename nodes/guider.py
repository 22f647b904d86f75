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

``cfg_schedule`` / ``cfg_id_schedule`` (``lynx_core.controls``) replace the constants per step; the
step comes from ``transformer_options["sample_sigmas"]`` (``LynxRunState.update_window``), so the
guidance mode may change from step to step (e.g. cfg_id ≤ 1 at a step: two passes there). Per-step
lists are checked against the sigmas when sampling starts, the first moment the guider knows them.
"""
from __future__ import annotations

import logging
import uuid

from lynx_core.controls import Schedule, as_schedule, scheduled
from lynx_core.guidance import combine_three_pass, guidance_mode
from lynx_core.lynx import COND, IDENTITIES, UNCOND

from .context_windows import window_latent_shape
from .wan_patch import LynxRunState, compute_dtype

log = logging.getLogger(__name__)

_CLASS = None


def image_only_conds(negative: list | None) -> list | None:
    """The negative conds for the ``i`` pass: the same entries, each with a fresh ``uuid``."""
    if negative is None:
        return None
    return [dict(c, uuid=uuid.uuid4()) if isinstance(c, dict) else c for c in negative]


def max_passes(cfgs: list[float], cfg_ids: list[float]) -> int:
    """The most passes any step can need, from every value cfg and cfg_id may take."""
    if max(cfgs) <= 1.0:
        return 1
    return 3 if max(cfg_ids) > 1.0 else 2


def guider_class():
    """The CFGGuider subclass (built on first use, so importing this module needs no ComfyUI)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import comfy.samplers

    class LynxCFGGuider(comfy.samplers.CFGGuider):
        def __init__(self, model_patcher, state: LynxRunState, cfg: float, cfg_id: float,
                     cfg_schedule=None, cfg_id_schedule=None):
            super().__init__(model_patcher)
            self.state = state
            self.cfg = float(cfg)
            self.cfg_id = float(cfg_id)
            self.cfg_schedule: Schedule | None = as_schedule(cfg_schedule, "cfg_schedule")
            self.cfg_id_schedule: Schedule | None = as_schedule(cfg_id_schedule, "cfg_id_schedule")
            self._neg_i: tuple[list, list] | None = None  # (negative conds of this run, their i-pass copies)
            self._warned_no_step = False

        def set_cfg_id(self, cfg_id: float) -> None:
            self.cfg_id = float(cfg_id)

        def guidance_at(self, step: tuple[int, int] | None) -> tuple[float, float]:
            """(cfg, cfg_id) of a step; the constants where there is no schedule or no known step."""
            if step is None and (self.cfg_schedule or self.cfg_id_schedule) and not self._warned_no_step:
                self._warned_no_step = True
                log.warning("cfg_schedule/cfg_id_schedule: the sampler does not report its sigmas "
                            "(transformer_options['sample_sigmas']), so the step is unknown; using cfg/cfg_id")
            k, n = step if step is not None else (None, None)
            return (scheduled(self.cfg_schedule, self.cfg, k, n), scheduled(self.cfg_id_schedule, self.cfg_id, k, n))

        def check_steps(self, total_steps: int) -> None:
            """Per-step lists must have one value per step (the guider learns the count here)."""
            for schedule in (self.cfg_schedule, self.cfg_id_schedule):
                if schedule is not None:
                    schedule.check_steps(total_steps)
            if self.state.patch is not None:
                self.state.patch.check_steps(total_steps)

        def passes_needed(self) -> int:
            cfgs = list(self.cfg_schedule.values) if self.cfg_schedule is not None else [self.cfg]
            cfg_ids = list(self.cfg_id_schedule.values) if self.cfg_id_schedule is not None else [self.cfg_id]
            return max_passes(cfgs, cfg_ids)

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            st = self.state
            sample_sigmas = (model_options.get("transformer_options") or {}).get("sample_sigmas")
            st.update_window(float(timestep.flatten()[0]), sample_sigmas)
            positive = self.conds.get("positive", None)
            negative = self.conds.get("negative", None)
            cfg, cfg_id = self.guidance_at(st.step)
            mode = guidance_mode(cfg, cfg_id)
            if mode == "three_pass":
                st.cond_identities = [COND, UNCOND, COND]
                c, u, i = comfy.samplers.calc_cond_batch(
                    self.inner_model, [positive, negative, self._image_only(negative)], x, timestep, model_options)
                out = combine_three_pass(u, i, c, cfg, cfg_id)
                for fn in model_options.get("sampler_post_cfg_function", []):
                    out = fn({"denoised": out, "cond": positive, "uncond": negative, "cond_scale": cfg,
                              "model": self.inner_model, "uncond_denoised": u, "cond_denoised": c,
                              "sigma": timestep, "model_options": model_options, "input": x})
                return out
            if mode == "two_pass":
                st.cond_identities = [COND, UNCOND]
                c, u = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative], x, timestep, model_options)
                return comfy.samplers.cfg_function(self.inner_model, c, u, cfg, x, timestep,
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
            sigmas = args[1] if len(args) > 1 else kwargs.get("sigmas")
            if sigmas is not None and len(sigmas) > 1:
                self.check_steps(len(sigmas) - 1)
            passes = self.passes_needed()
            identities = IDENTITIES if passes > 1 else (COND,)
            st = self.state
            st.check_swap_supported(self.model_patcher, device)
            try:
                shape = window_latent_shape(noise.shape, getattr(self, "model_options", None))
                st.prepare_run(device, compute_dtype(getattr(self, "inner_model", None), st.blocks), shape, passes,
                               identities)
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
