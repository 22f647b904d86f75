"""Which adapter weights train: full, lora, id_only, ref_only (and 'auto', which picks by memory).

AdamW on fp32 master weights holds about 16 bytes per trained parameter (weight, gradient, two
moments). Lynx-full has 4.28 B adapter parameters, so ``full`` needs about 68 GB for them alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

BYTES_PER_PARAM = {"adamw": 16, "adamw8bit": 10}  # fp32 weight + fp32 grad + (2x fp32 | 2x 8-bit + fp32 copy)


class TrainModeError(ValueError):
    """The chosen mode cannot train these adapters."""


@dataclass
class ModeChoice:
    mode: str
    reason: str


def optimizer_bytes(n_params: int, optimizer: str = "adamw") -> int:
    return n_params * BYTES_PER_PARAM[optimizer]


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def resolve_mode(mode: str, adapters, device_bytes: int | None, optimizer: str = "adamw",
                 headroom: float = 0.6) -> ModeChoice:
    """Pick the mode 'auto' means on this device and say what 'full' costs.

    ``device_bytes`` is the accelerator's total memory (None on the CPU, where 'auto' trains 'full'
    since host RAM is the limit and tiny models are the use). 'full' is chosen when its weights and
    optimizer state take at most ``headroom`` of the device, leaving the rest for the base model
    and activations.
    """
    n_full = adapters.num_params()
    cost = optimizer_bytes(n_full, optimizer)
    what = (f"'full' trains all {n_full / 1e9:.2f} B adapter parameters: about {_gb(cost)} of fp32 weights, "
            f"gradients and {optimizer} state")
    if mode != "auto":
        if mode == "full":
            log.info("%s", what)
        return ModeChoice(mode, f"mode = {mode!r} as configured")
    if device_bytes is None or cost <= headroom * device_bytes:
        return ModeChoice("full", f"auto: {what}, which fits")
    return ModeChoice("lora", f"auto: {what}, more than this device's {_gb(device_bytes)} allows; "
                              "training LoRA updates instead (set mode = \"full\" to insist, e.g. on a 141 GB GPU "
                              "or with FSDP over several GPUs)")


def set_trainable(adapters: nn.Module, mode: str, *, lora_rank: int = 64, lora_alpha: float = 0.0,
                  generator: torch.Generator | None = None) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything, then unfreeze what ``mode`` trains; returns the trained (name, parameter) pairs.

    'lora' wraps to_k_ip/to_v_ip/to_k_ref/to_v_ref with low-rank updates (lynx_core.train.lora) and
    also trains the resampler and the registers in full.
    """
    adapters.requires_grad_(False)
    if mode == "full":
        adapters.requires_grad_(True)
    elif mode == "id_only":
        adapters.resampler.requires_grad_(True)
        adapters.ip_layers.requires_grad_(True)
    elif mode == "ref_only":
        if adapters.ref_layers is None:
            raise TrainModeError("mode = \"ref_only\" but these adapters have no Ref-adapter (Lynx-lite); "
                                 "use mode = \"id_only\" or start from Lynx-full adapters")
        adapters.ref_layers.requires_grad_(True)
    elif mode == "lora":
        from .lora import apply_lora
        apply_lora(adapters, rank=lora_rank, alpha=lora_alpha or None, generator=generator)
        adapters.resampler.requires_grad_(True)
        for layer in adapters.ip_layers.values():
            if layer.registers is not None:
                layer.registers.requires_grad_(True)
    else:
        raise TrainModeError(f"unknown training mode {mode!r}; use full, lora, id_only or ref_only")
    trained = [(n, p) for n, p in adapters.named_parameters() if p.requires_grad]
    if not trained:
        raise TrainModeError(f"mode = {mode!r} leaves nothing to train in these adapters")
    return trained
