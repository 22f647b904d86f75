"""From config to where the frozen base lives: the memory plan, block placement and the runners.

On CUDA the plan (lynx_core.train.memory_plan) is made from measured free memory before anything
large moves, printed, and refused with its numbers when it cannot fit. Swapped blocks stay on the
host (the swapper makes their masters, fp8 if asked); everything else goes to the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..offload.swapper import move_non_block_parts
from .config import TrainConfig
from .memory_plan import TrainPlan, TrainPlanError, plan_training
from .runner import ActivationOffload, CheckpointRunner, plain_runner
from .swap import SwapRunner

log = logging.getLogger(__name__)


@dataclass
class MemorySetup:
    plan: Optional[TrainPlan]
    mode: str
    runner: Callable
    reference_runner: Optional[Callable]
    swap: Optional[SwapRunner] = None

    def close(self) -> None:
        if self.swap is not None:
            self.swap.close()


def _host_ram() -> int | None:
    try:
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# blocks_to_swap = -1 with neither fp8_base nor offload_activations set: the first of these that fits
# (all resident, then block swap, then block inputs in pinned RAM, then fp8 host copies as well).
PLAN_ESCALATION = ({"fp8_base": False, "offload_activations": False},
                   {"fp8_base": False, "offload_activations": True},
                   {"fp8_base": True, "offload_activations": True})


def choose_plan(cfg: TrainConfig, model: nn.Module, adapters: nn.Module, device, **budgets) -> TrainPlan:
    """The memory plan for ``cfg``; raises TrainPlanError (numbers and knobs) when none fits.

    ``budgets`` (device_total_bytes, device_free_bytes, host_ram_bytes) default to what CUDA and
    the OS report.
    """
    if not budgets and torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budgets = {"device_total_bytes": total, "device_free_bytes": free, "host_ram_bytes": _host_ram()}
    swap = "auto" if cfg.blocks_to_swap == -1 else cfg.blocks_to_swap
    explicit = cfg.fp8_base or cfg.offload_activations or cfg.blocks_to_swap != -1
    ladder = [{"fp8_base": cfg.fp8_base, "offload_activations": cfg.offload_activations}] if explicit \
        else PLAN_ESCALATION
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    error: Exception | None = None
    for knobs in ladder:
        try:
            return plan_training(model, adapters, tokens=cfg.token_budget, mode=cfg.mode, blocks_to_swap=swap,
                                 optimizer=cfg.optimizer, lora_rank=cfg.lora_rank, device=device,
                                 compute_dtype=dtype, **knobs, **budgets)
        except TrainPlanError as exc:
            error = exc
    raise error  # type: ignore[misc]


def plan_memory(cfg: TrainConfig, model: nn.Module, adapters: nn.Module, device: torch.device) -> Optional[TrainPlan]:
    """The plan on CUDA (None on the CPU, where host RAM is the only budget)."""
    return choose_plan(cfg, model, adapters, device) if device.type == "cuda" else None


def setup_memory(cfg: TrainConfig, model: nn.Module, adapters: nn.Module, device: torch.device,
                 mode: str) -> MemorySetup:
    """Place the base and build the block runner (checkpointing, block swap, activation offload)."""
    plan = plan_memory(cfg, model, adapters, device)
    if plan is not None:
        log.info("%s", plan.describe())
        print(plan.describe(), flush=True)
        mode = plan.mode
    if plan is not None:
        swapped, fp8, offload_on = plan.blocks_to_swap, plan.fp8_base, plan.offload_activations
    else:
        swapped, fp8, offload_on = max(0, cfg.blocks_to_swap), cfg.fp8_base, cfg.offload_activations
    if swapped == 0 and not fp8:
        model.to(device)
        offload = ActivationOffload() if offload_on else None
        runner = CheckpointRunner(offload) if (cfg.gradient_checkpointing or offload) else plain_runner
        return MemorySetup(plan, mode, runner, None)
    # Block swap recomputes every block in backward: checkpointing is implied.
    move_non_block_parts(model, device)
    options = plan.swap_options if plan is not None else {
        "blocks_to_swap": swapped, "fp8_base": fp8, "offload_activations": offload_on}
    swap = SwapRunner.attach(model.blocks, device=device, **options)
    return MemorySetup(plan, mode, swap, swap.forward_runner(model), swap)
