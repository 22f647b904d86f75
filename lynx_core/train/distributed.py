"""Data parallel training on PyTorch's own engines: DDP, or FSDP to shard the trainable adapters.

Launched by ``torchrun`` or ``accelerate launch``, a process finds its rank in the environment
(RANK, WORLD_SIZE, LOCAL_RANK: both launchers set them) and joins the process group; a plain
``python -m lynx_core train`` is a world of one and wraps nothing.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The world the launcher describes (no process group is created)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_world(device: torch.device, mode: str = "auto") -> World:
    world = launched_world()
    if mode == "none" or world.size == 1:
        if world.size > 1:
            raise RuntimeError(f"distributed = \"none\" but the launcher started {world.size} processes; "
                               "set distributed = \"auto\" (DDP) or \"fsdp\", or launch one process")
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        world.initialised_here = True
    log.info("rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world


def close_world(world: World) -> None:
    if world.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(objective: nn.Module, world: World, mode: str, device: torch.device) -> nn.Module:
    """DDP (replicated adapters, averaged gradients) or FSDP2 (sharded adapters and optimizer state)."""
    if not world.active:
        return objective
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        ad = objective.adapters
        # Shard each layer's projections, then the rest: one all-gather per unit as it is used.
        for layer in (*ad.ip_layers.values(), *((ad.ref_layers or {}).values())):
            for name in ("to_k_ip", "to_v_ip", "to_k_ref", "to_v_ref"):
                if hasattr(layer, name):
                    fully_shard(getattr(layer, name))
        fully_shard(ad.resampler)
        return fully_shard(objective)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(objective, device_ids=ids, broadcast_buffers=False)


def mean_across(value: float, world: World, device: torch.device) -> float:
    """The mean of a scalar over all processes (for logged losses)."""
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item() / world.size)


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
