"""LynxSampler and LynxGuider: patch a clone of the user's Wan MODEL and sample through ComfyUI."""
from __future__ import annotations

import importlib.util
import logging

import torch

from lynx_core.lynx import LynxPatch, make_conditioning

from . import comfy_env
from .denoise import check_denoise, comfy_tail, official_tail, schedule_steps
from .guider import guider_class
from .payloads import (LYNX_ADAPTERS, LYNX_FACE, LYNX_REF, AdaptersHandle, ReferenceFeatures, face_fingerprint,
                       same_face)
from .unipc import LYNX_UNIPC, lynx_unipc_sampler
from .wan_patch import LynxRunState, casts_weights_itself, check_model_fits, patch_model

log = logging.getLogger(__name__)

CATEGORY = "Lynx/sampling"
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def _guidance_inputs() -> dict:
    """Inputs shared by LynxSampler and LynxGuider (the order is the widget order)."""
    return {
        "model": ("MODEL", {"tooltip": "Wan2.1-T2V-14B (or a Wan2.2-A14B T2V expert) from any loader: "
                            "fp16/bf16, fp8-scaled, GGUF, with LoRAs applied. A Wan 14B image-to-video model "
                            "(Wan2.1-I2V, a Wan2.2-I2V-A14B expert, with WanImageToVideo) or Wan2.1-VACE-14B "
                            "(with WanVaceToVideo) works too. It is not modified: Lynx patches a copy."}),
        "adapters": (LYNX_ADAPTERS, {"tooltip": "From Load Lynx Adapters (full or lite)."}),
        "face": (LYNX_FACE, {"tooltip": "The identity from Lynx Encode Face ID."}),
        "positive": ("CONDITIONING", {"tooltip": "The prompt, from CLIP Text Encode with the Wan UMT5 text encoder."}),
        "negative": ("CONDITIONING", {"tooltip": "The negative prompt (CLIP Text Encode). Lynx's image-guidance "
                                      "pass also uses it, with the face."}),
    }


def _guidance_scales() -> dict:
    return {
        "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Text guidance g (official 5.0): how strongly the prompt is followed. "
                                     "≤ 1 disables guidance (one pass per step)."}),
        "cfg_id": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                             "tooltip": "Identity (image) guidance g_i (official 2.0) of the three-pass formula "
                                        "u + g_i·(i − u) + g·(c − i). ≤ 1 switches to plain two-pass CFG "
                                        "(faster: 2 model passes per step instead of 3; lite models use that)."}),
        "ip_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                               "tooltip": "Strength of the ID-adapter (face identity tokens in the text cross-attention). "
                                          "0 turns it off."}),
        "ref_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                "tooltip": "Strength of the Ref-adapter (reference-face features in self-attention; "
                                           "full adapters only). 0 turns it off and makes the reference input unnecessary."}),
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "First part of the sampling (fraction of the steps) in which the adapters act."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "The adapters act up to this fraction of the steps (1.0 = to the end). "
                                             "Steps outside the window run the plain Wan model."}),
    }


def _swap_input() -> dict:
    return {"blocks_to_swap": ("INT", {"default": 0, "min": -1, "max": 40,
                                       "tooltip": "Transformer blocks kept in CPU memory and streamed to the GPU "
                                                  "(block swap, for 24 GB cards). 0 = ComfyUI's own memory management; "
                                                  "-1 = choose from free VRAM."})}


def _reference_input() -> dict:
    return {"reference": (LYNX_REF, {"tooltip": "From Lynx Encode Reference. Needed by full adapters unless "
                                                "ref_scale is 0; lite adapters have no Ref-adapter and ignore it."})}


CONTROL_NAMES = ("ip_blocks", "ref_blocks", "cfg_schedule", "cfg_id_schedule", "ip_scale_schedule",
                 "ref_scale_schedule")
_SCHEDULE_FORMS = ("Empty = the {widget} widget at every step. One value per step: '5, 5, 4.5, 4' (as many as "
                   "the steps), or keyframes 'fraction:value': '0:5.0, 0.6:3.0' holds 5.0 from the start and 3.0 "
                   "from 60 % of the steps (the first keyframe must be 0). See docs/sampling.md.")


def _controls_inputs() -> dict:
    """Block subsets and per-step schedules (optional, after the existing optional inputs)."""
    def blocks(branch: str) -> tuple:
        return ("STRING", {"default": "", "multiline": False,
                           "tooltip": f"Blocks where the {branch} runs: empty = every block; e.g. '0-20, 25' "
                                      "(indices from 0, ranges inclusive); 'none' = no block. The other blocks run "
                                      "without this branch (plain Wan there), not a fallback."})

    def schedule(widget: str, extra: str = "") -> tuple:
        return ("STRING", {"default": "", "multiline": False,
                           "tooltip": _SCHEDULE_FORMS.format(widget=widget) + extra})

    window = " It acts inside start_percent/end_percent only; outside, the adapters are off."
    return {
        "ip_blocks": blocks("ID-adapter (ip_scale)"),
        "ref_blocks": blocks("Ref-adapter (ref_scale)"),
        "cfg_schedule": schedule("cfg", " A step at ≤ 1 runs the positive pass alone."),
        "cfg_id_schedule": schedule("cfg_id", " A step at ≤ 1 runs two-pass CFG (2 passes instead of 3)."),
        "ip_scale_schedule": schedule("ip_scale", window),
        "ref_scale_schedule": schedule("ref_scale", window),
    }


def parse_controls(controls: dict | None, num_blocks: int) -> dict:
    """The control inputs parsed (subsets: frozenset or None = all; schedules: Schedule or None);
    a malformed one raises ValueError naming the input. Step counts are checked when sampling."""
    from lynx_core.controls import as_schedule, block_subset

    controls = dict(controls or {})
    unknown = set(controls) - set(CONTROL_NAMES)
    if unknown:
        raise TypeError(f"unknown control inputs {sorted(unknown)}")
    out = {}
    for name in CONTROL_NAMES:
        value = controls.get(name)
        value = "" if value is None else value
        out[name] = block_subset(value, num_blocks, name) if name.endswith("_blocks") else as_schedule(value, name)
    return out


def check_blocks_to_swap(blocks_to_swap: int, num_blocks: int) -> int:
    """0 = ComfyUI's memory management; -1 = auto (lynx_core.offload plans from free VRAM)."""
    n = int(blocks_to_swap)
    if n < -1 or n > num_blocks:
        raise ValueError(f"blocks_to_swap={n}: use 0 (off), -1 (auto) or a count up to the model's {num_blocks} blocks")
    if n != 0 and importlib.util.find_spec("lynx_core.offload") is None:
        raise ValueError(f"blocks_to_swap={n}: block swap is not available in this installation; set it to 0")
    return n


def _adapters(adapters) -> AdaptersHandle:
    if not isinstance(adapters, AdaptersHandle):
        raise TypeError("adapters: connect the output of Load Lynx Adapters")
    return adapters


def check_reference_face(reference: ReferenceFeatures, embedding: torch.Tensor) -> bool:
    """Warn (and return False) when the reference was made from another face than ``face``.

    Not an error: mixing the Ref-adapter of one photo with the identity of another is a legitimate
    experiment, but done by accident it gives a blend of two people without a word."""
    if same_face(reference.face_embedding, embedding):
        return True
    log.warning(
        "reference: it was made from another face (fingerprint %s) than the 'face' input of this node (%s); "
        "the video will mix two identities. Connect the same Lynx Encode Face ID output to Lynx Encode "
        "Reference and to this node, unless the mix is intended.",
        reference.face_fingerprint, face_fingerprint(embedding))
    return False


def build_guider(model, adapters, face, positive, negative, cfg, cfg_id, ip_scale, ref_scale,
                 start_percent, end_percent, blocks_to_swap, reference=None, official_sigmas=None,
                 controls: dict | None = None):
    """Clone + patch ``model`` and return a ready Lynx guider (positive/negative set).

    ``controls``: the optional inputs of :data:`CONTROL_NAMES` (text; missing or "" = today's behaviour)."""
    handle = _adapters(adapters)
    _dm, dim, num_blocks = check_model_fits(model, handle.adapters)
    ctl = parse_controls(controls, num_blocks)
    swap = check_blocks_to_swap(blocks_to_swap, num_blocks)
    if face is None or not hasattr(face, "embedding"):
        raise TypeError("face: connect the 'face' output of Lynx Encode Face ID")
    embedding = face.embedding
    if embedding is None:
        return _plain_guider(model, positive, negative, cfg, cfg_id, start_percent, end_percent, swap, official_sigmas,
                             ctl["cfg_schedule"])

    ref_cond = ref_uncond = None
    if handle.has_ref and float(ref_scale) != 0.0:
        if isinstance(reference, ReferenceFeatures) and not reference.cond:
            raise ValueError(
                "reference: it holds no features: Lynx Encode Reference was given lite adapters (they have no "
                "Ref-adapter) or a face without an identity. Connect the same full adapters and face to Lynx Encode "
                "Reference, or set ref_scale to 0 to run without the Ref-adapter.")
        if not isinstance(reference, ReferenceFeatures):
            raise ValueError(
                "reference: full Lynx adapters need the reference features. Connect Lynx Encode Reference "
                "to 'reference', or set ref_scale to 0 to run without the Ref-adapter.")
        if (reference.dim, reference.num_blocks) != (dim, num_blocks):
            raise ValueError(
                f"reference: it was computed on a {reference.dim}-wide {reference.num_blocks}-block model but "
                f"'model' is {dim}-wide with {num_blocks} blocks; feed Lynx Encode Reference the same model.")
        check_reference_face(reference, embedding)
        ref_cond, ref_uncond = reference.cond, reference.uncond
    elif reference is not None and not handle.has_ref:
        log.info("reference: %s adapters have no Ref-adapter; the reference is not used", handle.variant)

    conditioning = make_conditioning(handle.adapters, embedding, ref_cond, ref_uncond)
    # The adapters stay where ComfyUI keeps them (CPU normally): the guider streams one layer at a
    # time to the GPU to precompute their keys/values before the steps.
    patch = LynxPatch(handle.adapters, conditioning, ip_scale=ip_scale, ref_scale=ref_scale,
                      norm_moves_itself=casts_weights_itself, ip_blocks=ctl["ip_blocks"], ref_blocks=ctl["ref_blocks"],
                      ip_scale_schedule=ctl["ip_scale_schedule"], ref_scale_schedule=ctl["ref_scale_schedule"])
    state = LynxRunState(patch=patch, start_percent=start_percent, end_percent=end_percent, blocks_to_swap=swap)
    if official_sigmas is not None:
        state.timestep_sigmas, state.timestep_values = official_sigmas
    clone = patch_model(model, state, official_timesteps=official_sigmas is not None)
    guider = guider_class()(clone, state, cfg, cfg_id, cfg_schedule=ctl["cfg_schedule"],
                            cfg_id_schedule=ctl["cfg_id_schedule"])
    guider.set_conds(positive, negative)
    return guider


def _plain_guider(model, positive, negative, cfg, cfg_id, start_percent, end_percent, swap, official_sigmas,
                  cfg_schedule=None):
    """No identity (Encode Face ID in pass_through mode found no face): plain Wan, no adapters.

    Without an identity the image-only pass equals the unconditional one, so the three-pass
    formula reduces to ordinary CFG; the guider runs that (two passes, or one for cfg ≤ 1).
    ``cfg_schedule`` still applies; the cfg_id schedule has nothing to act on.
    """
    log.warning("face: no usable face was found (on_no_face = pass_through); sampling plain Wan without "
                "Lynx (no identity, the adapters and the reference are not used)")
    state = LynxRunState(patch=None, start_percent=start_percent, end_percent=end_percent, blocks_to_swap=swap)
    if official_sigmas is not None:
        state.timestep_sigmas, state.timestep_values = official_sigmas
    clone = patch_model(model, state, official_timesteps=official_sigmas is not None)
    guider = guider_class()(clone, state, cfg, min(float(cfg_id), 1.0), cfg_schedule=cfg_schedule)
    guider.set_conds(positive, negative)
    return guider


class LynxGuider:
    DESCRIPTION = ("Lynx guidance as a GUIDER for SamplerCustomAdvanced: the patched model and the "
                   "three-pass identity guidance, with your own noise, sampler and sigmas.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustomAdvanced's guider input.",)
    FUNCTION = "get_guider"

    @classmethod
    def INPUT_TYPES(cls):
        required = _guidance_inputs()
        required.update(_guidance_scales())
        required.update(_swap_input())
        optional = _reference_input()
        optional.update(_controls_inputs())
        return {"required": required, "optional": optional}

    def get_guider(self, model, adapters, face, positive, negative, cfg, cfg_id, ip_scale, ref_scale,
                   start_percent, end_percent, blocks_to_swap, reference=None, ip_blocks="", ref_blocks="",
                   cfg_schedule="", cfg_id_schedule="", ip_scale_schedule="", ref_scale_schedule=""):
        controls = dict(ip_blocks=ip_blocks, ref_blocks=ref_blocks, cfg_schedule=cfg_schedule,
                        cfg_id_schedule=cfg_id_schedule, ip_scale_schedule=ip_scale_schedule,
                        ref_scale_schedule=ref_scale_schedule)
        # The step count is only known when sampling starts; per-step lists are checked then.
        return (build_guider(model, adapters, face, positive, negative, cfg, cfg_id, ip_scale, ref_scale,
                             start_percent, end_percent, blocks_to_swap, reference, controls=controls),)


def pure_noise_start(noise: torch.Tensor, sigma0: float | torch.Tensor) -> torch.Tensor:
    """What to hand ComfyUI so that sampling starts from ``noise`` itself, as the official run does.

    ComfyUI's flow models start from ``σ0·noise + (1 − σ0)·latent`` (an empty latent is 0), so the
    noise is divided by σ0 here. ``σ0·(n/σ0)`` is ``n`` again up to one float32 ulp (about one
    element in 4000 at σ0 = 0.9997; exact in the model's bf16/fp16 input but for rounding ties).
    """
    s = torch.as_tensor(sigma0, dtype=noise.dtype, device=noise.device)
    return noise / s


def comfy_sigmas(model_patcher, scheduler: str, steps: int, sampler_name: str, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas as ComfyUI's KSampler computes them (including its penultimate-sigma and denoise rules)."""
    import comfy.samplers

    ms = model_patcher.get_model_object("model_sampling")

    def full(n: int) -> torch.Tensor:
        if sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return comfy.samplers.calculate_sigmas(ms, scheduler, n)

    return comfy_tail(full, steps, denoise)


def sampler_object(sampler_name: str):
    """lynx_unipc (the official UniPC, nodes/unipc.py) or any ComfyUI sampler by name."""
    if sampler_name == LYNX_UNIPC:
        return lynx_unipc_sampler()
    import comfy.samplers

    return comfy.samplers.sampler_object(sampler_name)


class LynxSampler:
    DESCRIPTION = ("Samples a Wan2.1-T2V-14B video of the person in the face photo: patches a copy of the "
                   "model with the Lynx adapters and runs any ComfyUI sampler and scheduler with Lynx's "
                   "three-pass identity guidance. Decode the LATENT with the Wan VAE.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The denoised video latent; decode it with VAE Decode (Wan 2.1 VAE).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        required = _guidance_inputs()
        required["latent_image"] = ("LATENT", {"tooltip": "Size and length of the video: an empty Wan latent "
                                                          "(EmptyHunyuanLatentVideo / Wan22ImageToVideoLatent ...); "
                                                          "the official run is 832×480, 81 frames."})
        required["seed"] = ("INT", {"default": 42, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                    "tooltip": "Noise seed (official 42). The same seed with the official schedule "
                                               "draws the official initial noise."})
        required["steps"] = ("INT", {"default": 50, "min": 1, "max": 1000,
                                     "tooltip": "Denoising steps (official 50)."})
        required.update(_guidance_scales())
        required["sampler_name"] = ([LYNX_UNIPC] + comfy_env.sampler_names(), {"default": LYNX_UNIPC,
                                    "tooltip": "lynx_unipc = the official sampler (UniPC as the official pipeline runs "
                                               "it: bh2, order 2, first order on the last step, last step to sigma 0); "
                                               "works with every scheduler. Or any ComfyUI sampler (ComfyUI's "
                                               "uni_pc_bh2 is a different UniPC formulation)."})
        required["scheduler"] = (comfy_env.scheduler_names(), {"default": comfy_env.OFFICIAL_SCHEDULER,
                                 "tooltip": "lynx_official = the official flow-matching sigma list (flow shift "
                                            "'shift', integer timesteps, pure-noise start); or any ComfyUI scheduler "
                                            "(those use the model's own shift, e.g. from ModelSamplingSD3)."})
        required["shift"] = ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.1,
                                       "tooltip": "Flow shift of the lynx_official schedule (3.0 for 480p as the "
                                                  "official run, 5.0 for 720p). Ignored by other schedulers."})
        required.update(_swap_input())
        optional = _reference_input()
        optional["denoise"] = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": "Part of the noise added to latent_image (1.0 = all of it: "
                                                    "text-to-video from an empty latent, today's numbers). Below 1 "
                                                    "for video-to-video from VAE Encode of a video: the last "
                                                    "'steps' steps of a round(steps/denoise)-step schedule run, "
                                                    "starting from sigma0·noise + (1 − sigma0)·latent."})
        optional.update(_controls_inputs())
        return {"required": required, "optional": optional}

    def sample(self, model, adapters, face, positive, negative, latent_image, seed, steps, cfg, cfg_id,
               ip_scale, ref_scale, start_percent, end_percent, sampler_name, scheduler, shift,
               blocks_to_swap, reference=None, denoise=1.0, ip_blocks="", ref_blocks="", cfg_schedule="",
               cfg_id_schedule="", ip_scale_schedule="", ref_scale_schedule=""):
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.utils
        import latent_preview

        denoise = check_denoise(denoise)
        official = scheduler == comfy_env.OFFICIAL_SCHEDULER
        official_sigmas = None
        if official:
            sig64, timesteps = official_tail(int(steps), float(shift), denoise)
            official_sigmas = (sig64[:-1], timesteps)
        controls = dict(ip_blocks=ip_blocks, ref_blocks=ref_blocks, cfg_schedule=cfg_schedule,
                        cfg_id_schedule=cfg_id_schedule, ip_scale_schedule=ip_scale_schedule,
                        ref_scale_schedule=ref_scale_schedule)
        guider = build_guider(model, adapters, face, positive, negative, cfg, cfg_id, ip_scale, ref_scale,
                              start_percent, end_percent, blocks_to_swap, reference, official_sigmas,
                              controls=controls)
        guider.check_steps(int(steps))  # per-step lists of the wrong length fail before the model loads
        sigmas = (sig64.to(torch.float32) if official else
                  comfy_sigmas(guider.model_patcher, scheduler, int(steps), sampler_name, denoise))

        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_image["samples"])
        latent["samples"] = samples
        # The official noise is float32 from a CPU generator: ComfyUI's prepare_noise draws the same
        # numbers for a float32 latent (row 0 of a batch is the official [1, 16, F', H/8, W/8] draw).
        noise = comfy.sample.prepare_noise(samples.to(torch.float32) if official else samples, seed,
                                           latent.get("batch_index"))
        empty = torch.count_nonzero(samples) == 0
        whole = schedule_steps(int(steps), denoise) == int(steps)
        if not whole and empty:
            log.warning("denoise %.3g with an empty latent_image: the run starts from partial noise over zeros "
                        "(a washed-out video). For video-to-video connect VAE Encode of a video; for "
                        "text-to-video set denoise to 1.0", denoise)
        if official and empty and whole and float(sigmas[0]) > 0:
            # The official run starts from pure noise at σ0 = 0.9997; ComfyUI would scale it by σ0.
            # A partial schedule (denoise < 1) keeps ComfyUI's σ0·noise start: that is its flow state.
            noise = pure_noise_start(noise, sigmas[0])
        sampler = sampler_object(sampler_name)
        callback = latent_preview.prepare_callback(guider.model_patcher, sigmas.shape[-1] - 1, {})
        out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        latent["samples"] = out.to(comfy.model_management.intermediate_device())
        return (latent,)
