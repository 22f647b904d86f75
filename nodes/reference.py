"""LynxEncodeReference: the Ref-adapter's reference features, computed once per face.

Spec §5.2: the 256 px aligned face (and a mid-grey image for the unconditional pass) goes through
the Wan VAE as a posterior *sample* with the official noise (CPU generator, seed + 1, bf16), is
normalised with the model's latent format, and runs once through the user's Wan model at t = 0
with the UMT5 embedding of "image of a face". Every block's modulated, normalised self-attention
input is kept (``lynx_core.block.wan_block_forward``'s capture) and reused by every denoising step.
"""
from __future__ import annotations

import logging

import torch

from lynx_core.block import wan_block_forward
from lynx_core.block_i2v import ImageTextContext
from lynx_core.reference import REFERENCE_PROMPT
from lynx_core.seeds import reference_noise

from .payloads import LYNX_ADAPTERS, LYNX_FACE, LYNX_REF, AdaptersHandle, ReferenceFeatures
from .vace import reference_pass_kwargs
from .wan_patch import check_model_fits, comfy_attention, comfy_rope, image_condition_channels, wan_diffusion_model

log = logging.getLogger(__name__)

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


WAN_VAE_FILE = "wan_2.1_vae.safetensors"
# Wan 2.1 VAE: 16 latent channels, 8x spatial and 4x temporal compression. Wan2.1-T2V-14B and both
# Wan2.2-A14B experts share it; the reference latent goes straight into the DiT, so any other
# latent space gives garbage reference tokens without any error.
WAN_LATENT_CHANNELS, WAN_SPATIAL, WAN_TEMPORAL = 16, 8, 4


def vae_compression(vae) -> tuple[int | None, int | None]:
    """(spatial, temporal) compression of a ComfyUI VAE, None where the object does not say."""
    formula = getattr(vae, "downscale_index_formula", None)
    if isinstance(formula, (tuple, list)) and len(formula) == 3:
        return int(formula[-1]), int(formula[0])
    ratio = getattr(vae, "downscale_ratio", None)
    if isinstance(ratio, (int, float)):
        return int(ratio), 1  # an image VAE: frames are not compressed
    if isinstance(ratio, (tuple, list)) and ratio and isinstance(ratio[-1], (int, float)):
        return int(ratio[-1]), None
    return None, None


def _vae_error(what: str, hint: str = "") -> ValueError:
    return ValueError(
        f"vae: {what}, but Lynx Encode Reference needs the Wan 2.1 VAE ({WAN_LATENT_CHANNELS} latent channels, "
        f"{WAN_SPATIAL}x spatial and {WAN_TEMPORAL}x temporal compression).{hint} Load {WAN_VAE_FILE} with "
        "Load VAE and connect it to 'vae'.")


def check_wan_vae(vae) -> None:
    """Refuse VAEs other than Wan 2.1's before anything is encoded (ComfyUI's VAE attributes)."""
    if vae is None or not hasattr(vae, "encode"):
        raise ValueError(f"vae: connect the Wan 2.1 VAE (Load VAE with {WAN_VAE_FILE})")
    channels = getattr(vae, "latent_channels", None)
    spatial, temporal = vae_compression(vae)
    found = []
    if isinstance(channels, int) and channels != WAN_LATENT_CHANNELS:
        found.append(f"{channels} latent channels")
    if spatial is not None and spatial != WAN_SPATIAL:
        found.append(f"{spatial}x spatial compression")
    if temporal is not None and temporal != WAN_TEMPORAL:
        found.append(f"{temporal}x temporal compression")
    if not found:
        return
    hint = ""
    if temporal == 1:
        hint = " It is an image VAE (SD, SDXL, Flux style)."
    elif channels == 48:
        hint = (" It is the Wan 2.2 VAE, which only Wan2.2-TI2V-5B uses; Wan2.1-T2V-14B and Wan2.2-A14B use the "
                "Wan 2.1 VAE.")
    raise _vae_error("this VAE has " + ", ".join(found), hint)


def check_wan_latent(latent: torch.Tensor, pixels: torch.Tensor) -> None:
    """The encoded reference must be one Wan latent frame [1, 16, 1, H/8, W/8] (for VAEs whose
    attributes did not tell)."""
    h, w = pixels.shape[1] // WAN_SPATIAL, pixels.shape[2] // WAN_SPATIAL
    if latent.ndim != 5 or latent.shape[1] != WAN_LATENT_CHANNELS or tuple(latent.shape[-2:]) != (h, w):
        raise _vae_error(f"this VAE encoded the {pixels.shape[2]}x{pixels.shape[1]} face into a latent of shape "
                         f"{list(latent.shape)} instead of [1, {WAN_LATENT_CHANNELS}, 1, {h}, {w}]")


def vae_posterior_sample(vae, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """Encode ``pixels`` (IMAGE [1, H, W, 3]) and draw mean + std·ε with the official ε.

    ComfyUI's VAE returns the posterior mean only; the log-variance is read off the Wan VAE's
    final 1×1 conv (``conv1``), whose output is [mean, logvar]. VAEs without it (or a tiled
    fallback encode) give the mean, with a warning.
    """
    fsm = getattr(vae, "first_stage_model", None)
    conv = getattr(fsm, "conv1", None)
    captured: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda _m, _i, out: captured.append(out.detach())) if conv is not None else None
    try:
        mean = vae.encode(pixels)
    finally:
        if handle is not None:
            handle.remove()
    check_wan_latent(mean, pixels)
    if len(captured) == 1 and captured[0].shape[1] == 2 * mean.shape[1] and captured[0].shape[2:] == mean.shape[2:]:
        mu, logvar = captured[0].chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = reference_noise(seed, tuple(mu.shape), device=mu.device).to(mu.dtype)
        return (mu + std * eps).to(mean.device, torch.float32)
    log.warning("reference: the VAE did not expose its posterior variance; using the posterior mean "
                "(the official code samples it with seed + 1)")
    return mean


def encode_text(clip, text: str) -> torch.Tensor:
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens(tokens)


class _CapturePatch:
    def __init__(self, index: int, blocks, store: dict, keep_device):
        self.index, self.blocks, self.store, self.keep_device = index, blocks, store, keep_device

    def __call__(self, args: dict, extra: dict) -> dict:
        def keep(n1: torch.Tensor) -> None:
            self.store[self.index] = n1.detach().to(self.keep_device)

        to = args.get("transformer_options", {}) or {}
        block = self.blocks[self.index]
        context = args["txt"]
        if hasattr(block.cross_attn, "k_img"):
            # Wan2.1-I2V: no image is given to the reference pass, so its image branch is left out
            # (docs/sampling.md, "Image-to-video").
            context = ImageTextContext(text=context, image=None)
        out = wan_block_forward(block, args["img"], args["vec"], args["pe"], context,
                                rope=comfy_rope, attention=comfy_attention(to), capture=keep)
        return {"img": out}


def without_weight_patches(model_patcher):
    """A clone of the MODEL without the weight patches applied to it (LoRA loaders, model merges), so
    a pass on it runs the frozen base weights; the MODEL itself is returned when it has none.

    The clone shares the base model; ComfyUI restores the base weights when it loads the clone (and
    puts the patches back when the patched MODEL is loaded for sampling), as for two LoRA chains
    that share one checkpoint."""
    import uuid

    if not getattr(model_patcher, "patches", None):
        return model_patcher
    clone = model_patcher.clone()
    clone.patches = {}
    clone.patches_uuid = uuid.uuid4()
    return clone


def reference_pass(model, latent: torch.Tensor, context: torch.Tensor) -> dict[int, torch.Tensor]:
    """Run the Wan model once at t = 0 and return every block's captured input [1, tokens, dim]."""
    import comfy.model_management as mm

    dm, _dim, num_blocks = wan_diffusion_model(model, image_to_video=True)
    store: dict[int, torch.Tensor] = {}
    clone = model.clone()
    blocks = list(dm.blocks)
    keep = mm.unet_offload_device()
    for i in range(num_blocks):
        clone.set_model_patch_replace(_CapturePatch(i, blocks, store, keep), "dit", "double_block", i)
    mm.load_models_gpu([clone])
    device = clone.load_device
    x = latent.to(device)
    sigma = torch.zeros((x.shape[0],), device=device, dtype=torch.float32)
    extra = image_condition_channels(dm)
    # Image-to-video models take mask + image latent channels as well: zeros, ComfyUI's own feed
    # when no image is given, so the features describe the face latent alone as on T2V.
    c_concat = torch.zeros((x.shape[0], extra, *x.shape[2:]), device=device, dtype=x.dtype) if extra else None
    with torch.no_grad():
        clone.model.apply_model(x, sigma, c_concat=c_concat, c_crossattn=context.to(device),
                                transformer_options=clone.model_options["transformer_options"].copy(),
                                **reference_pass_kwargs(dm, x))  # VACE: a zero context at strength 0
    if len(store) != num_blocks:
        raise RuntimeError(f"reference pass captured {len(store)} of {num_blocks} blocks; another node pack may "
                           "replace the Wan blocks (patches_replace 'dit') of this model")
    return store


class LynxEncodeReference:
    DESCRIPTION = ("Reference features for the Ref-adapter (full adapters): the aligned face is VAE-encoded and "
                   "run once through the Wan model at t = 0 with the text \"image of a face\". Computed once, "
                   "reused by every step.")
    CATEGORY = "Lynx/face"
    RETURN_TYPES = (LYNX_REF,)
    RETURN_NAMES = ("reference",)
    OUTPUT_TOOLTIPS = ("Connect to the reference input of Lynx Sampler / Lynx Guider.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The same Wan model that Lynx Sampler uses (LoRAs included)."}),
            "vae": ("VAE", {"tooltip": "The Wan 2.1 VAE (wan_2.1_vae)."}),
            "clip": ("CLIP", {"tooltip": "The Wan UMT5-XXL text encoder (CLIP Loader, type wan); encodes "
                                         "\"image of a face\" for the reference pass."}),
            "face": (LYNX_FACE, {"tooltip": "From Lynx Encode Face ID; its 256 px aligned face is the reference."}),
            "adapters": (LYNX_ADAPTERS, {"tooltip": "From Load Lynx Adapters (checks that model and adapters fit; "
                                                    "lite adapters have no Ref-adapter and skip this work)."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": MAX_SEED,
                             "tooltip": "The VAE posterior noise uses seed + 1, as the official code; use the "
                                        "sampler's seed to reproduce the official run."}),
        }, "optional": {
            "reference_loras": ("BOOLEAN", {"default": False,
                                            "tooltip": "Off (default): the reference pass runs on the model without "
                                                       "the LoRAs (weight patches) applied to it, because the "
                                                       "Ref-adapter was trained on features of the frozen base Wan; "
                                                       "the sampler still uses the LoRAs. On: the reference features "
                                                       "come from the model as connected, LoRAs included."}),
        }}

    def encode(self, model, vae, clip, face, adapters, seed, reference_loras=False):
        if not isinstance(adapters, AdaptersHandle):
            raise TypeError("adapters: connect the output of Load Lynx Adapters")
        _dm, dim, num_blocks = check_model_fits(model, adapters.adapters)
        if not adapters.has_ref:
            log.info("Lynx Encode Reference: %s adapters have no Ref-adapter; nothing to compute", adapters.variant)
            return (ReferenceFeatures(cond={}, uncond={}, dim=dim, num_blocks=num_blocks, seed=int(seed)),)
        if face is None or not hasattr(face, "embedding"):
            raise TypeError("face: connect the 'face' output of Lynx Encode Face ID")
        crop = getattr(face, "reference_crop", None)
        if face.embedding is None:
            # Encode Face ID in pass_through mode found no face: the sampler then runs plain Wan, so the
            # queue keeps going instead of stopping here.
            log.warning("face: no usable face was found (on_no_face = pass_through); no reference features, "
                        "the sampler will run without Lynx")
            return (ReferenceFeatures(cond={}, uncond={}, dim=dim, num_blocks=num_blocks, seed=int(seed)),)
        if crop is None:
            raise ValueError("face: no face was found in the photo, so there is no reference image. Use a photo with "
                             "a visible face, or set ref_scale to 0 in the sampler and remove this node.")
        if clip is None:
            raise ValueError("clip: connect the Wan UMT5 text encoder (CLIP Loader, type wan)")
        check_wan_vae(vae)
        pixels = torch.from_numpy(crop.copy()).to(torch.float32).div(255.0).unsqueeze(0)
        grey = torch.full_like(pixels, 0.5)  # 0 in the VAE's [-1, 1] range: the official uncond image
        latent_format = model.get_model_object("latent_format")
        context = encode_text(clip, REFERENCE_PROMPT)
        ref_model = model if reference_loras else without_weight_patches(model)
        feats = []
        for px in (pixels, grey):
            z = latent_format.process_in(vae_posterior_sample(vae, px, int(seed)))
            feats.append(reference_pass(ref_model, z, context))
        return (ReferenceFeatures(cond=feats[0], uncond=feats[1], dim=dim, num_blocks=num_blocks, seed=int(seed),
                                  face_embedding=face.embedding.detach().float().cpu().reshape(-1).clone()),)
