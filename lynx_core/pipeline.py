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
from .controls import Schedule, as_schedule, scheduled
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
    # Run the step's passes (c, u, i) as one batched forward: None = when the device memory
    # allows it, and always under block swap (each streamed block then crosses the bus once per
    # step instead of once per pass); False = one forward per pass. Same numbers within fp32
    # rounding either way.
    batch_passes: bool | None = None
    # Controls (lynx_core.controls). Block subsets: None keeps the patch's own (every block unless
    # it says otherwise), "" = every block, "0-20, 25" / a list of indices = those blocks only.
    # Schedules: "" = the constant above at every step; one value per step ("5, 5, 4.5, 4" or a
    # list of numbers, as many as ``steps``) or keyframes ("0:5.0, 0.6:3.0"). None = the constant
    # too, except that ip/ref scale schedules given to the patch itself are then kept.
    ip_blocks: str | Sequence[int] | None = None
    ref_blocks: str | Sequence[int] | None = None
    cfg_schedule: str | Sequence[float] | Schedule | None = None
    cfg_id_schedule: str | Sequence[float] | Schedule | None = None
    ip_scale_schedule: str | Sequence[float] | Schedule | None = None
    ref_scale_schedule: str | Sequence[float] | Schedule | None = None

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
        # Parsed and checked against the steps here; "" stays "" (the constant, replacing a scale
        # schedule of the patch), None stays None (keep the patch's own).
        schedules = {name: _schedule_or_blank(getattr(self, name), name) for name in SCHEDULES}
        for schedule in schedules.values():
            if isinstance(schedule, Schedule):
                schedule.check_steps(self.steps)
        return replace(self, cfg_id=float(cfg_id), ip_scale=float(ip), ref_scale=float(ref), **schedules)

    def guidance_at(self, step_index: int) -> tuple[float, float]:
        """(cfg, cfg_id) of one step: the schedules where given, else the constants."""
        cfg_id = self.cfg_id if self.cfg_id is not None else VARIANT_CFG_ID["full"]
        return (scheduled(as_schedule(self.cfg_schedule, "cfg_schedule"), self.cfg, step_index, self.steps),
                scheduled(as_schedule(self.cfg_id_schedule, "cfg_id_schedule"), cfg_id, step_index, self.steps))


SCHEDULES = ("cfg_schedule", "cfg_id_schedule", "ip_scale_schedule", "ref_scale_schedule")


def _schedule_or_blank(value, name: str):
    if value is None:
        return None
    return as_schedule(value, name) or ""


PASSES = {"none": 1, "two_pass": 2, "three_pass": 3}


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


def _rows_block_fn(model, patch: LynxPatch | None, identities: Sequence[str],
                   groups: Sequence[tuple[slice, torch.Tensor]] | None):
    """BlockFn for a batched forward. ``groups`` (rows, embedded context) is set when the passes'
    texts differ in length: each group then runs the block on its own rows with its own context
    (still one block use, so one transfer under block swap) and the BlockFn's context is ignored."""
    if groups is None:
        return lynx_block_fn(model, patch, identities)

    def fn(index, block, x, e, freqs, _context):
        outs = []
        for rows, ctx in groups:
            adapters = None
            if patch is not None:
                adapters = patch.block_inputs(index, block, identities[rows], x.device, x.dtype)
            outs.append(wan_block_forward(block, x[rows], e[rows], freqs, ctx, rope=apply_rope,
                                          attention=model.attention, adapters=adapters))
        return torch.cat(outs)
    return fn


def predict_batched(model, x, timestep, contexts: Sequence[torch.Tensor], patch: LynxPatch | None,
                    identities: Sequence[str], block_runner=None) -> list[torch.Tensor]:
    """Several passes on the same latents in one forward: row r uses ``contexts[r]`` (embedded by
    ``model.embed_text``) and ``identities[r]``. Returns one [1, ...] prediction per row.

    ``x`` has batch 1; its tokens and time embedding are computed once and shared by the rows, so
    each row starts from exactly what :func:`predict` feeds the blocks. Contexts of one length are
    stacked; different lengths run as groups inside each block (the official encoder zero-pads every
    prompt to 512 tokens, so real runs stack).
    """
    if x.shape[0] != 1:
        raise ValueError(f"predict_batched takes latents with batch 1, got {list(x.shape)}")
    identities = list(identities)
    rows = len(identities)
    tokens, grid, e, temb, freqs = model.embed_latents(x, timestep)
    tokens = tokens.expand(rows, -1, -1).contiguous()
    e, temb = e.expand(rows, *e.shape[1:]), temb.expand(rows, *temb.shape[1:])
    if len({c.shape[1] for c in contexts}) == 1:
        ctx, groups = torch.cat(list(contexts)), None
    else:
        ctx, groups = contexts[0], []
        start = 0
        for r in range(1, rows + 1):  # consecutive rows with the same context form one group
            if r == rows or contexts[r] is not contexts[start]:
                groups.append((slice(start, r), torch.cat([contexts[start]] * (r - start))))
                start = r
    run = block_runner or model.run_blocks
    tokens = run(tokens, e, freqs, ctx, _rows_block_fn(model, patch, identities, groups))
    out = model.unpatchify(model.head(tokens, temb), grid)
    return list(out.split(1))


def batch_fits(model, rows: int, latent: Sequence[int], dtype: torch.dtype, device) -> bool:
    """Whether ``rows`` rows of one forward fit the device's free memory (activation estimate of
    :func:`lynx_core.offload.estimate_activation_bytes`). The host always says yes."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type == "cpu"
    from .offload import estimate_activation_bytes

    cfg = model.config
    pf, ph, pw = cfg.patch_size
    tokens = (int(latent[2]) // pf) * (int(latent[3]) // ph) * (int(latent[4]) // pw)
    need = estimate_activation_bytes(tokens, cfg.dim, cfg.ffn_dim, dtype, batch=rows, head_dim=cfg.head_dim)
    free, _total = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return need <= free


def should_batch_passes(setting: bool | None, model, rows: int, latent: Sequence[int], dtype, device,
                        block_swap: bool) -> bool:
    """The ``batch_passes`` decision (see :class:`GenerationSettings`)."""
    if setting is not None:
        return bool(setting)
    if rows < 2 or int(latent[0]) != 1:  # batched rows are the passes of one latent
        return False
    return block_swap or batch_fits(model, rows, latent, dtype, device)


def predict(model, x, timestep, context, patch: LynxPatch | None, identity: str, block_runner=None):
    """One forward pass of the DiT with Lynx adapters for one identity (COND or UNCOND)."""
    tokens, grid, e, temb, ctx, freqs = model.embed(x, timestep, context)
    run = block_runner or model.run_blocks
    tokens = run(tokens, e, freqs, ctx, lynx_block_fn(model, patch, [identity]))
    return model.unpatchify(model.head(tokens, temb), grid)


def make_velocity_fn(model, prompt_ctx, negative_ctx, settings: GenerationSettings,
                     patch: LynxPatch | None, block_runner=None):
    """model_fn(x, sigma, t, i) running the official pass order c, u, i and combining them
    (batched into one forward per ``settings.batch_passes``; under a ``block_runner``, i.e. block
    swap, ``None`` always batches).

    ``settings`` should be :meth:`GenerationSettings.resolved` for ``patch``; unresolved ones are
    resolved here (the scales are then only read, never written to the patch: :func:`generate` does that).
    """
    settings = settings.resolved(patch)
    # cfg / cfg_id may follow schedules, so the guidance mode (and the number of passes) is per step;
    # the batching decision is made for the step with the most passes.
    guidance = [settings.guidance_at(k) for k in range(settings.steps)]
    modes = [guidance_mode(cfg, cfg_id) for cfg, cfg_id in guidance]
    dtype = model.patch_embedding.weight.dtype
    passes = max(PASSES[m] for m in modes)
    batched: dict[str, object] = {}

    def embedded_texts():
        # The text embedding does not change over the steps: computed once per generation.
        if "texts" not in batched:
            with torch.no_grad():
                batched["texts"] = (model.embed_text(prompt_ctx), model.embed_text(negative_ctx))
        return batched["texts"]

    @torch.no_grad()
    def model_fn(x, sigma, timestep, step_index):
        if patch is not None:
            patch.active = adapter_window_active(step_index, settings.steps, settings.start_percent,
                                                 settings.end_percent)
            patch.set_step(step_index, settings.steps)
        cfg, cfg_id = guidance[step_index]
        mode = modes[step_index]
        step_passes = PASSES[mode]
        xin = x.to(dtype)
        t = timestep.to(x.device)
        if "on" not in batched:
            batched["on"] = should_batch_passes(settings.batch_passes, model, passes, x.shape, dtype,
                                                x.device, block_swap=block_runner is not None)
            log.info("Lynx: %d pass(es) per step, %s", passes,
                     "batched into one forward" if batched["on"] and passes > 1 else "one forward each")
        if batched["on"] and step_passes > 1:
            p, n = embedded_texts()
            rows = ([COND, UNCOND, COND], [p, n, n]) if step_passes == 3 else ([COND, UNCOND], [p, n])
            outs = predict_batched(model, xin, t, rows[1], patch, rows[0], block_runner)
            if step_passes == 2:
                return combine_two_pass(outs[1], outs[0], cfg).float()
            return combine_three_pass(outs[1], outs[2], outs[0], cfg, cfg_id).float()
        c = predict(model, xin, t, prompt_ctx, patch, COND, block_runner)
        if mode == "none":
            return c.float()
        u = predict(model, xin, t, negative_ctx, patch, UNCOND, block_runner)
        if mode == "two_pass":
            return combine_two_pass(u, c, cfg).float()
        i = predict(model, xin, t, negative_ctx, patch, COND, block_runner)
        return combine_three_pass(u, i, c, cfg, cfg_id).float()
    return model_fn


@contextmanager
def _scales_applied(patch: LynxPatch | None, settings: GenerationSettings) -> Iterator[None]:
    """Give the patch the settings' scales for one generation, then its own scales and window back."""
    if patch is None:
        yield
        return
    names = ("ip_scale", "ref_scale", "ip_blocks", "ref_blocks", "ip_scale_schedule", "ref_scale_schedule")
    own = {name: getattr(patch, name) for name in names}
    patch.ip_scale, patch.ref_scale = settings.ip_scale, settings.ref_scale
    # None keeps the patch's own subsets and scale schedules; anything else replaces them.
    for name in names[2:]:
        if getattr(settings, name) is not None:
            setattr(patch, name, getattr(settings, name))
    try:
        yield
    finally:
        for name, value in own.items():
            setattr(patch, name, value)
        patch.active = True
        patch.set_step(None, None)


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
    if patch is None and any(getattr(settings, n) not in (None, "") for n in
                             ("ip_blocks", "ref_blocks", "ip_scale_schedule", "ref_scale_schedule")):
        log.warning("Lynx: adapter block subsets/scale schedules were given without a LynxPatch; they have no effect")
    device = model.patch_embedding.weight.device
    x = initial_noise(settings.seed, tuple(shape)).to(device)
    sigmas, timesteps = flow_sigmas(settings.steps, settings.shift)
    model_fn = make_velocity_fn(model, prompt_ctx.to(device), negative_ctx.to(device), settings, patch,
                                block_runner)
    sampler = get_sampler(settings.sampler)
    with _scales_applied(patch, settings):
        if patch is not None:
            patch.check_steps(settings.steps)  # a scale list of the wrong length fails before step 0
        return sampler(model_fn, x, sigmas, timesteps, callback=callback, cancel=cancel)
