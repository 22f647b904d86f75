"""Standalone Lynx text-to-video sampling on lynx_core's WanModel (demo, tests, training, parity).

Inside ComfyUI the same pieces (Lynx block, guidance, adapter cache) run through ComfyUI's sampler.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from .block import wan_block_forward
from .guidance import adapter_window_active, combine_three_pass, combine_two_pass, guidance_mode
from .lynx import COND, UNCOND, LynxPatch
from .sampling.samplers import get_sampler
from .sampling.schedule import flow_sigmas
from .seeds import initial_noise
from .wan.rope import apply_rope

log = logging.getLogger(__name__)


# What each official CLI runs when the caller does not say: full uses three-pass identity guidance
# (cfg_id 2); lite dropped guidance_scale_i and runs classic two-pass CFG (any cfg_id <= 1 means that).
VARIANT_CFG_ID = {"full": 2.0, "lite": 0.0}


@dataclass
class GenerationSettings:
    """Sampling settings of one standalone generation; the defaults are the official CLIs'.

    ``cfg_id=None`` follows the patch's adapters: 2.0 (three passes) for full adapters and without a
    patch, 0.0 (two passes) for lite ones. ``ip_scale`` / ``ref_scale`` = None keep the patch's own
    scales; a number replaces them for this generation (the patch gets its own back afterwards).
    """
    seed: int = 42
    steps: int = 50
    cfg: float = 5.0
    cfg_id: float | None = None
    ip_scale: float | None = None
    ref_scale: float | None = None
    start_percent: float = 0.0
    end_percent: float = 1.0
    sampler: str = "unipc"
    shift: float = 3.0

    @classmethod
    def for_variant(cls, variant: str, **overrides) -> "GenerationSettings":
        """The official defaults of one adapter variant (``"full"`` or ``"lite"``), with overrides."""
        if variant not in VARIANT_CFG_ID:
            raise ValueError(f"unknown Lynx variant {variant!r}; use one of {sorted(VARIANT_CFG_ID)}")
        return cls(**{"cfg_id": VARIANT_CFG_ID[variant], **overrides})

    def resolved(self, patch: LynxPatch | None) -> "GenerationSettings":
        """These settings with every None filled in for ``patch`` (see the class docstring)."""
        variant = getattr(getattr(patch, "adapters", None), "variant", "full")
        cfg_id = self.cfg_id if self.cfg_id is not None else VARIANT_CFG_ID.get(variant, VARIANT_CFG_ID["full"])
        ip = self.ip_scale if self.ip_scale is not None else (patch.ip_scale if patch is not None else 1.0)
        ref = self.ref_scale if self.ref_scale is not None else (patch.ref_scale if patch is not None else 1.0)
        return replace(self, cfg_id=float(cfg_id), ip_scale=float(ip), ref_scale=float(ref))


def latent_shape(frames: int, height: int, width: int, channels: int = 16) -> tuple[int, ...]:
    """Latent shape of a Wan2.1 video; frames must be 4k+1 and sizes multiples of 16."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"frames must be 4k+1 and height/width multiples of 16; got {frames} frames "
                         f"at {width}x{height}. Try {((frames - 1) // 4) * 4 + 1} frames and "
                         f"{width // 16 * 16}x{height // 16 * 16}")
    return (1, channels, (frames - 1) // 4 + 1, height // 8, width // 8)


def lynx_block_fn(model, patch: LynxPatch | None, identities: Sequence[str]):
    """BlockFn that runs each block with the adapter inputs for the given row identities."""
    def fn(index, block, x, e, freqs, context):
        adapters = None
        if patch is not None:
            adapters = patch.block_inputs(index, block, identities, x.device, x.dtype)
        return wan_block_forward(block, x, e, freqs, context, rope=apply_rope,
                                 attention=model.attention, adapters=adapters)
    return fn


def predict(model, x, timestep, context, patch: LynxPatch | None, identity: str, block_runner=None):
    """One forward pass of the DiT with Lynx adapters for one identity (COND or UNCOND)."""
    tokens, grid, e, temb, ctx, freqs = model.embed(x, timestep, context)
    run = block_runner or model.run_blocks
    tokens = run(tokens, e, freqs, ctx, lynx_block_fn(model, patch, [identity]))
    return model.unpatchify(model.head(tokens, temb), grid)


def make_velocity_fn(model, prompt_ctx, negative_ctx, settings: GenerationSettings,
                     patch: LynxPatch | None, block_runner=None):
    """model_fn(x, sigma, t, i) running the official pass order c, u, i and combining them.

    ``settings`` should be :meth:`GenerationSettings.resolved` for ``patch``; unresolved ones are
    resolved here (the scales are then only read, never written to the patch: :func:`generate` does that).
    """
    settings = settings.resolved(patch)
    mode = guidance_mode(settings.cfg, settings.cfg_id)
    dtype = model.patch_embedding.weight.dtype

    @torch.no_grad()
    def model_fn(x, sigma, timestep, step_index):
        if patch is not None:
            patch.active = adapter_window_active(step_index, settings.steps, settings.start_percent,
                                                 settings.end_percent)
        xin = x.to(dtype)
        t = timestep.to(x.device)
        c = predict(model, xin, t, prompt_ctx, patch, COND, block_runner)
        if mode == "none":
            return c.float()
        u = predict(model, xin, t, negative_ctx, patch, UNCOND, block_runner)
        if mode == "two_pass":
            return combine_two_pass(u, c, settings.cfg).float()
        i = predict(model, xin, t, negative_ctx, patch, COND, block_runner)
        return combine_three_pass(u, i, c, settings.cfg, settings.cfg_id).float()
    return model_fn


@contextmanager
def _scales_applied(patch: LynxPatch | None, settings: GenerationSettings) -> Iterator[None]:
    """Give the patch the settings' scales for one generation, then its own scales and window back."""
    if patch is None:
        yield
        return
    own = (patch.ip_scale, patch.ref_scale)
    patch.ip_scale, patch.ref_scale = settings.ip_scale, settings.ref_scale
    try:
        yield
    finally:
        patch.ip_scale, patch.ref_scale = own
        patch.active = True


def generate(model, prompt_ctx: torch.Tensor, negative_ctx: torch.Tensor, shape: Sequence[int],
             settings: GenerationSettings | None = None, patch: LynxPatch | None = None,
             callback: Callable | None = None, cancel: Callable[[], bool] | None = None,
             block_runner=None) -> torch.Tensor:
    """Sample latents [1,16,F',H/8,W/8] (fp32). Noise is drawn on the CPU in fp32 from ``seed``.

    ``settings`` defaults to the official settings of the patch's adapter variant; see
    :class:`GenerationSettings` for how its None fields follow the patch.
    """
    settings = (settings or GenerationSettings()).resolved(patch)
    if patch is None and (settings.ip_scale, settings.ref_scale) != (1.0, 1.0):
        log.warning("Lynx: ip_scale/ref_scale were given without a LynxPatch; they have no effect")
    device = model.patch_embedding.weight.device
    x = initial_noise(settings.seed, tuple(shape)).to(device)
    sigmas, timesteps = flow_sigmas(settings.steps, settings.shift)
    model_fn = make_velocity_fn(model, prompt_ctx.to(device), negative_ctx.to(device), settings, patch,
                                block_runner)
    sampler = get_sampler(settings.sampler)
    with _scales_applied(patch, settings):
        return sampler(model_fn, x, sigmas, timesteps, callback=callback, cancel=cancel)
