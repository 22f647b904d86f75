"""ComfyUI's MODEL -> lynx_core's WanModel for training, without copying the frozen weights.

ComfyUI's Wan DiT (``model.model.diffusion_model``) keeps the original Wan parameter names, which
are also lynx_core's, so the engine's ``WanModel`` is built on the meta device with the config read
off the shapes and handed the SAME tensors (``load_state_dict(assign=True)``). Copies are made only
where they must be:

* weights created under ``torch.inference_mode()`` (ComfyUI runs its loaders there) cannot be saved
  for backward, so they are cloned outside it (the base is frozen, but backward through a frozen
  linear layer still saves its weight);
* LoRAs applied with a LoRA loader live as patches of the ModelPatcher: patched weights are
  computed once (ComfyUI's own ``comfy.lora.calculate_weight``) and trained against;
* fp8 weights are cast up to the compute dtype (scaled fp8: times ``scale_weight``).

Refused with a message: GGUF and other quantised tensor types (no exact dense weights to train
against), and scheduled LoRA hooks (their weights change per step).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from lynx_core.wan.checkpoint import infer_config
from lynx_core.wan.model import WanModel

from .wan_patch import WanModelError, wan_diffusion_model

log = logging.getLogger(__name__)

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
# Extra per-layer tensors of ComfyUI's scaled-fp8 layers: folded into the weight, then dropped.
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")

CalculateWeight = Callable[[list, Tensor, str], Tensor]


class TrainingModelError(WanModelError):
    """The MODEL cannot be trained against as it is; the message says what to load instead."""


def _is_quantised(t: Tensor) -> bool:
    """GGUF (ComfyUI-GGUF's GGMLTensor), ComfyUI's QuantizedTensor and similar Tensor subclasses."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return False
    name = type(t).__name__
    return "GGML" in name or "Quant" in name or hasattr(t, "tensor_type") or hasattr(t, "_layout_type")


def refuse_unsupported(model_patcher, input_name: str = "model") -> None:
    """Scheduled LoRA hooks and quantised weights cannot be trained against."""
    hooks = getattr(model_patcher, "hook_patches", None)
    if hooks:
        raise TrainingModelError(
            f"{input_name}: this MODEL has scheduled LoRA hooks (Create Hook LoRA / hook keyframes); their weights "
            "change during sampling, so there is no single base to train against. Apply the LoRA with a LoRA "
            "loader (LoraLoaderModelOnly) instead, or remove it for training.")
    dm, _dim, _n = wan_diffusion_model(model_patcher, input_name)
    for name, t in dm.state_dict(keep_vars=True).items():
        if _is_quantised(t):
            raise TrainingModelError(
                f"{input_name}: weight {name} is a {type(t).__name__} (GGUF or another quantised format). Training "
                "needs dense weights: load the bf16 or fp8 Wan2.1-T2V-14B .safetensors with Load Diffusion Model "
                "(models/diffusion_models) for training; the GGUF stays fine for generating.")


def _comfy_calculate_weight() -> Optional[CalculateWeight]:
    try:
        import comfy.lora
    except ImportError:
        return None
    return comfy.lora.calculate_weight


def _dense(name: str, t: Tensor, state: dict, dtype: torch.dtype) -> Tensor:
    if t.dtype in FP8_DTYPES:
        scale = state.get(name[: -len(".weight")] + ".scale_weight") if name.endswith(".weight") else None
        out = t.to(dtype)
        if scale is not None:
            out = out * scale.to(dtype)
        return out
    return t


def base_state(model_patcher, dtype: Optional[torch.dtype] = None,
               calculate_weight: Optional[CalculateWeight] = None) -> dict[str, Tensor]:
    """The frozen weights the DiT really computes with, keyed by the original Wan names.

    Unpatched, non-inference, non-fp8 tensors are returned as they are (no copy)."""
    dm, _dim, _n = wan_diffusion_model(model_patcher)
    raw = {k: v for k, v in dm.state_dict().items()}
    patches = getattr(model_patcher, "patches", None) or {}
    prefix = "diffusion_model."
    if patches and calculate_weight is None:
        calculate_weight = _comfy_calculate_weight()
        if calculate_weight is None:
            raise TrainingModelError("model: it carries LoRA patches but comfy.lora is not importable to apply them")
    target = dtype or next((v.dtype for v in raw.values() if v.is_floating_point() and v.dtype not in FP8_DTYPES),
                           torch.bfloat16)
    out: dict[str, Tensor] = {}
    fp8 = patched = cloned = 0
    for name, t in raw.items():
        if name.endswith(_SCALE_SUFFIXES):
            continue
        dense = _dense(name, t, raw, target)
        fp8 += dense is not t
        key = prefix + name
        if key in patches:
            dense = calculate_weight(patches[key], dense.detach().to(torch.float32, copy=True), key).to(target)
            patched += 1
        if dtype is not None and dense.is_floating_point() and dense.dtype != dtype:
            dense = dense.to(dtype)
        if dense.is_inference():
            dense = dense.clone()
            cloned += 1
        out[name] = dense.detach()
    if fp8 or patched or cloned:
        log.info("training base: %d fp8 weight(s) cast to %s, %d LoRA-patched weight(s) applied, %d inference-mode "
                 "tensor(s) cloned for autograd", fp8, target, patched, cloned)
    return out


def engine_model(model_patcher, dtype: Optional[torch.dtype] = None,
                 calculate_weight: Optional[CalculateWeight] = None) -> WanModel:
    """A frozen lynx_core WanModel over the MODEL's weights. Call outside ``torch.inference_mode``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("engine_model must run under torch.inference_mode(False): weights made in inference "
                           "mode cannot be saved for backward")
    refuse_unsupported(model_patcher)
    state = base_state(model_patcher, dtype, calculate_weight)
    dm = model_patcher.model.diffusion_model
    # ComfyUI's WanModel keeps num_heads; head_dim 128 (every Wan2.1 size) is the fallback.
    heads = getattr(dm, "num_heads", None) or getattr(dm.blocks[0].self_attn, "num_heads", None)
    cfg = infer_config(state, num_heads=int(heads) if heads else None)
    with torch.device("meta"):
        model = WanModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("freqs")]
    if missing or unexpected:
        raise TrainingModelError(
            f"model: its Wan DiT does not match a Wan2.1 T2V DiT of width {cfg.dim} (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); load Wan2.1-T2V-14B (or a Wan2.2-A14B T2V expert) for training")
    return model.eval().requires_grad_(False)
