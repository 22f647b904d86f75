"""ComfyUI glue that runs the Lynx block inside ComfyUI's own Wan model.

ComfyUI's ``WanModel`` keeps the original Wan module names, so ``lynx_core.block.wan_block_forward``
runs directly on its blocks. The pack never edits the user's MODEL: it clones the ModelPatcher and
adds, on the clone only,

* a per-block replace patch (``patches_replace["dit"][("double_block", i)]``) for every block,
* a DIFFUSION_MODEL wrapper that gives the model the official integer timesteps when the
  ``lynx_official`` schedule is used.

The adapters are *not* an additional model of the clone: ComfyUI would load all 4+ GB of them to the
GPU for the whole run. Once ComfyUI has loaded the diffusion model, the guider computes every
block's adapter keys/values (``LynxRunState.prepare_run``), streaming one adapter layer at a time
from wherever ComfyUI keeps the adapters; the steps then only read those cached keys/values.

A block patch falls back to ComfyUI's own block whenever Lynx has nothing to add (outside the
start/end window, a zero scale), so those steps are bit-identical to plain ComfyUI.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lynx_core.block import wan_block_forward
from lynx_core.controls import step_at_sigma
from lynx_core.block_i2v import split_context
from lynx_core.guidance import adapter_window_active_sigma, validate_window
from lynx_core.lynx import COND, IDENTITIES, LynxPatch

from .vace import WRAPPER_KEY as VACE_WRAPPER_KEY, VaceRefFrames, is_vace_model, vace_frames_wrapper

log = logging.getLogger(__name__)

PATCH_KEY = "lynx"


class WanModelError(ValueError):
    """The MODEL input is not a Wan DiT these adapters can patch."""


def image_condition_channels(dm) -> int:
    """Input channels beyond the latent's: 20 (4 mask + 16 image latent) on Wan2.1/2.2 I2V, 0 on T2V."""
    in_ch = getattr(getattr(dm, "patch_embedding", None), "in_channels", None)
    out_ch = getattr(dm, "out_dim", None)
    return max(0, int(in_ch) - int(out_ch)) if in_ch is not None and out_ch is not None else 0


def has_image_tokens(dm) -> bool:
    """Wan2.1-I2V / FLF2V: the blocks attend CLIP image tokens put in front of the text context."""
    blocks = getattr(dm, "blocks", None)
    return bool(blocks) and hasattr(blocks[0].cross_attn, "k_img")


def wan_diffusion_model(model_patcher, input_name: str = "model", image_to_video: bool = False):
    """The ComfyUI ``WanModel`` inside a MODEL, checked by module names and shapes.

    Image-conditioned models are refused unless ``image_to_video`` (the Lynx sampling and reference
    paths handle them; training builds a T2V model). Returns ``(diffusion_model, dim, num_blocks)``.
    """
    base = getattr(model_patcher, "model", None)
    dm = getattr(base, "diffusion_model", None)
    blocks = getattr(dm, "blocks", None)
    needed = ("self_attn", "cross_attn", "norm3", "ffn", "modulation")
    if dm is None or blocks is None or len(blocks) == 0 or not all(hasattr(blocks[0], n) for n in needed):
        kind = type(dm).__name__ if dm is not None else type(model_patcher).__name__
        raise WanModelError(
            f"{input_name}: this is a {kind}, not a Wan2.1/Wan2.2 DiT. Load Wan2.1-T2V-14B (or a Wan2.2-A14B "
            "expert, or a Wan 14B image-to-video model) with a diffusion-model loader (Load Diffusion Model, a "
            "GGUF loader, ...) and connect it here.")
    # Image-to-video models (Wan2.1-I2V-14B with its image embedder, Wan2.2-I2V-A14B with only the
    # 36 input channels) are patched like T2V ones; check_model_fits refuses other widths/depths.
    if not image_to_video and (image_condition_channels(dm) or has_image_tokens(dm)):
        raise WanModelError(
            f"{input_name}: this is a Wan image-to-video (image-conditioned) model; this node needs the "
            "text-to-video Wan2.1-T2V-14B the adapters are trained on (Lynx Sampler and Lynx Guider run on "
            "image-to-video models as well). Load the T2V model here.")
    # VACE models (Wan2.1-VACE-14B, Wan2.2 VACE-Fun) are patched on their main blocks; see nodes/vace.py.
    dim = int(getattr(dm, "dim", 0) or blocks[0].modulation.shape[-1])
    return dm, dim, len(blocks)


def check_model_fits(model_patcher, adapters, input_name: str = "model"):
    """Refuse models whose width/depth differ from the adapters' (e.g. Wan 1.3B or 5B)."""
    dm, dim, num_blocks = wan_diffusion_model(model_patcher, input_name, image_to_video=True)
    adapters.check_fits(dim, num_blocks, model_name=f"'{input_name}' input")
    return dm, dim, num_blocks


def casts_weights_itself(module: torch.nn.Module) -> bool:
    """ComfyUI's cast-on-forward layers (lowvram, fp8 manual cast, GGUF) copy their weights to the
    input's device and apply LoRA patches themselves, so they are called as they are."""
    return bool(getattr(module, "comfy_cast_weights", False))


def compute_dtype(base_model, blocks: Sequence[torch.nn.Module] = ()) -> torch.dtype:
    """The dtype of the hidden states in ComfyUI's Wan blocks (``BaseModel._apply_model`` casts the
    input to the manual-cast dtype, else to the weight dtype)."""
    dtype = getattr(base_model, "manual_cast_dtype", None)
    if dtype is None and hasattr(base_model, "get_dtype"):
        dtype = base_model.get_dtype()
    if dtype is None:
        floats = [p.dtype for b in blocks[:1] for p in b.parameters() if p.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    return dtype


def comfy_rope(x: torch.Tensor, freqs) -> torch.Tensor:
    from comfy.ldm.flux.math import apply_rope1

    return apply_rope1(x, freqs)


def comfy_attention(transformer_options: dict):
    """``(q, k, v, heads) -> out`` through ComfyUI's attention (honours --use-sage-attention etc.)."""
    from comfy.ldm.modules import attention as comfy_attn

    def attend(q, k, v, heads):
        try:
            return comfy_attn.optimized_attention(q, k, v, heads=heads, transformer_options=transformer_options)
        except TypeError:  # ComfyUI releases whose attention functions take no transformer_options
            return comfy_attn.optimized_attention(q, k, v, heads=heads)

    return attend


@dataclass
class LynxRunState:
    """What the block patches read while one guider samples; owned by that guider."""

    patch: LynxPatch | None = None
    blocks: Sequence[torch.nn.Module] = ()
    cond_identities: list[str] = field(default_factory=lambda: [COND])
    start_percent: float = 0.0
    end_percent: float = 1.0
    # Official timesteps: float64 sigmas of the lynx_official schedule -> int64 timesteps.
    timestep_sigmas: torch.Tensor | None = None
    timestep_values: torch.Tensor | None = None
    # Block swap (lynx_core.offload): requested count (0 off, -1 auto) and the live swapper.
    blocks_to_swap: int = 0
    swapper: object | None = None
    # Bytes of the adapter keys/values precomputed for this run (kept out of the swap plan's budget).
    kv_bytes: int = 0
    # The step of the current model call, (index, total) from transformer_options["sample_sigmas"]
    # (None when ComfyUI does not say); per-step schedules read it. The float list of the last
    # sigma tensor seen is kept, so the tensor is read back once per run, not once per call.
    step: tuple[int, int] | None = None
    _sigma_list: tuple[object, list[float]] | None = field(default=None, repr=False)
    # Wan2.1-I2V: CLIP image tokens leading the context of the current model call (ComfyUI's
    # context_img_len; None without a CLIP vision embedding), set by _image_tokens_wrapper.
    image_tokens: int | None = None
    # VACE models: the reference-image frames of the current model call (nodes/vace.py), whose
    # tokens the Ref-adapter skips; None on other models.
    vace: VaceRefFrames | None = None

    def __post_init__(self) -> None:
        self.start_percent, self.end_percent = validate_window(self.start_percent, self.end_percent)

    def identities(self, cond_or_uncond: Sequence[int] | None, rows: int) -> list[str]:
        """COND/UNCOND for each batch row of one model call.

        ComfyUI batches the guider's conds in chunks; ``cond_or_uncond`` lists, per chunk, the index
        of the cond in the list the guider passed to ``calc_cond_batch`` and each chunk has the
        same number of rows.
        """
        chunks = list(cond_or_uncond) if cond_or_uncond else [0]
        per_chunk = max(1, rows // len(chunks))
        out = []
        for idx in chunks:
            ident = self.cond_identities[idx] if 0 <= idx < len(self.cond_identities) else COND
            out += [ident] * per_chunk
        return out[:rows] if len(out) >= rows else out + [out[-1]] * (rows - len(out))

    def step_at(self, sigma: float, sample_sigmas: torch.Tensor | None) -> tuple[int, int] | None:
        """(step index, steps) of a model call at ``sigma`` of the run's ``sample_sigmas``."""
        if sample_sigmas is None or len(sample_sigmas) < 2:
            return None
        if self._sigma_list is None or self._sigma_list[0] is not sample_sigmas:
            self._sigma_list = (sample_sigmas, [float(v) for v in sample_sigmas])
        s = self._sigma_list[1]
        return step_at_sigma(sigma, s), len(s) - 1

    def update_window(self, sigma: float, sample_sigmas: torch.Tensor | None) -> bool:
        """Switch the adapters on/off for the model call at ``sigma`` (step semantics of the spec:
        on for steps k with start ≤ k/N < end, mapped to the schedule's sigmas), and record the
        step for the per-step schedules (``self.step``, and the patch's scale schedules)."""
        self.step = self.step_at(sigma, sample_sigmas)
        if self.patch is None:
            return False
        self.patch.set_step(*(self.step or (None, None)))
        if self.start_percent <= 0.0 and self.end_percent >= 1.0:
            active = True
        elif sample_sigmas is None or len(sample_sigmas) < 2:
            active = self.start_percent <= 0.0 < self.end_percent
        else:
            s = self._sigma_list[1]  # read back once per run by step_at
            n = len(s) - 1
            k_start, k_end = math.ceil(self.start_percent * n - 1e-9), math.ceil(self.end_percent * n - 1e-9)
            if k_start >= min(k_end, n):
                active = False
            else:
                active = adapter_window_active_sigma(sigma, s[k_start], s[min(k_end, n)])
        self.patch.active = active
        return active

    def official_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Replace ComfyUI's float timesteps (σ·1000) by the official truncated ones."""
        if self.timestep_sigmas is None:
            return t
        table = self.timestep_sigmas.to(device=t.device, dtype=torch.float64) * 1000.0
        diff = (t.double().reshape(-1, 1) - table.reshape(1, -1)).abs()
        best = diff.argmin(dim=1)
        close = diff.gather(1, best.reshape(-1, 1)).reshape(-1) < 1e-2
        mapped = self.timestep_values.to(device=t.device)[best].to(t.dtype)
        return torch.where(close, mapped, t.reshape(-1)).reshape(t.shape)

    def _swaps(self, device) -> bool:
        return bool(self.blocks_to_swap) and device is not None and torch.device(device).type != "cpu"

    def check_swap_supported(self, model_patcher, device) -> None:
        """Scheduled LoRA hooks rewrite weights in place during sampling, which would write into the
        streamed host copies; refuse that combination instead of producing wrong weights."""
        if self._swaps(device) and getattr(model_patcher, "hook_patches", None):
            raise ValueError(
                "blocks_to_swap: block swap cannot stream a model that has scheduled LoRA hooks (Create Hook "
                "LoRA / Set CLIP Hooks / hook keyframes). Apply the LoRA with a LoRA loader instead, or set "
                "blocks_to_swap to 0.")

    def prepare_run(self, device, dtype: torch.dtype, latent_shape: Sequence[int], passes: int = 3,
                    identities: Sequence[str] = IDENTITIES) -> int:
        """Before the first step (ComfyUI has loaded the model): precompute the adapter keys/values
        on ``device``, then plan block swap with them counted. Returns the cached bytes."""
        free = None
        if self._swaps(device) and self.blocks_to_swap < 0 and torch.device(device).type == "cuda":
            from lynx_core.offload import measure_free_bytes
            from lynx_core.offload.plan import normalize_device

            # Measured before the keys/values exist, so the plan's reserve can count them once.
            free = measure_free_bytes(normalize_device(device))
        self.kv_bytes = 0
        if self.patch is not None:
            self.kv_bytes = self.patch.precompute(self.blocks, device, dtype, identities)
        self.attach_swap(device, latent_shape, passes, free_bytes=free, dtype=dtype)
        return self.kv_bytes

    def attach_swap(self, device, latent_shape: Sequence[int], passes: int = 3, free_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Stream ``blocks_to_swap`` blocks from host memory for this run (after ComfyUI loaded the model)."""
        if not self._swaps(device):
            return
        from lynx_core.offload import DEFAULT_RESERVE_BYTES, attach_block_swap

        tokens = int(latent_shape[2]) * (int(latent_shape[3]) // 2) * (int(latent_shape[4]) // 2) if len(latent_shape) == 5 else 0
        count = "auto" if self.blocks_to_swap < 0 else int(self.blocks_to_swap)
        # ComfyUI's RoPE tables are float32 (rope_bytes=4); the cached adapter keys/values stay on
        # the device for the whole run, so they are reserved next to the default headroom.
        self.swapper = attach_block_swap(self.blocks, count, device, borrowed=True, tokens=tokens,
                                         batch=int(latent_shape[0]) if latent_shape else 1, passes=passes,
                                         reserve_bytes=DEFAULT_RESERVE_BYTES + self.kv_bytes, rope_bytes=4,
                                         free_bytes=free_bytes, dtype=dtype)

    def detach_swap(self) -> None:
        if self.swapper is not None:
            swapper, self.swapper = self.swapper, None
            swapper.close()

    def release(self) -> None:
        """Drop per-generation caches (cached adapter keys/values); called in ``finally``."""
        self.detach_swap()
        self.kv_bytes = 0
        self.step, self._sigma_list = None, None
        if self.patch is not None:
            self.patch.release()
            self.patch.active = True
        if self.vace is not None:
            self.vace.reset()


class LynxBlockPatch:
    """The replace patch for block ``index``: ComfyUI's block, or the Lynx block with adapters."""

    def __init__(self, index: int, state: LynxRunState) -> None:
        self.index = index
        self.state = state

    def __call__(self, args: dict, extra: dict) -> dict:
        swapper = self.state.swapper
        if swapper is not None:
            with swapper.use(self.index):
                return self._run(args, extra)
        return self._run(args, extra)

    def _run(self, args: dict, extra: dict) -> dict:
        st = self.state
        lp = st.patch
        if lp is None or not lp.active:
            return extra["original_block"](args)
        x = args["img"]
        to = args.get("transformer_options", {}) or {}
        block = st.blocks[self.index]
        rows = st.identities(to.get("cond_or_uncond"), x.shape[0])
        inputs = lp.block_inputs(self.index, block, rows, device=x.device, dtype=x.dtype)
        if inputs is None:
            return extra["original_block"](args)
        context = args["txt"]
        if hasattr(block.cross_attn, "k_img"):
            context = split_context(context, st.image_tokens)
        attention = comfy_attention(to)
        layout = st.vace.layout(x, attention) if st.vace is not None and inputs.ref is not None else None
        out = wan_block_forward(block, x, args["vec"], args["pe"], context, rope=comfy_rope,
                                attention=attention, adapters=inputs, layout=layout)
        return {"img": out}


def _timestep_wrapper(state: LynxRunState):
    def wrapper(executor, x, timestep, *args, **kwargs):
        return executor(x, state.official_timestep(timestep), *args, **kwargs)

    return wrapper


def _image_tokens_wrapper(state: LynxRunState):
    """Records ComfyUI's ``context_img_len`` (``clip_fea.shape[-2]``) for the block patches, which
    only see the concatenated context."""
    def wrapper(executor, x, timestep, context=None, clip_fea=None, *args, **kwargs):
        state.image_tokens = None if clip_fea is None else int(clip_fea.shape[-2])
        return executor(x, timestep, context, clip_fea, *args, **kwargs)

    return wrapper


def patch_model(model_patcher, state: LynxRunState, official_timesteps: bool = False):
    """A clone of ``model_patcher`` whose Wan blocks run through Lynx; the input is not modified.

    The adapters are deliberately not added as an additional model (see the module docstring)."""
    import comfy.patcher_extension

    dm, _dim, num_blocks = wan_diffusion_model(model_patcher, image_to_video=True)
    clone = model_patcher.clone()
    state.blocks = list(dm.blocks)
    for i in range(num_blocks):
        clone.set_model_patch_replace(LynxBlockPatch(i, state), "dit", "double_block", i)
    if official_timesteps:
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY,
                                   _timestep_wrapper(state))
    if has_image_tokens(dm):
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY,
                                   _image_tokens_wrapper(state))
    if is_vace_model(dm):
        state.vace = VaceRefFrames()
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, VACE_WRAPPER_KEY,
                                   vace_frames_wrapper(state.vace))
    return clone
