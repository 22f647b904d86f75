"""The trainer's side of checkpoints, resume, export and the loss plot (formats in checkpoint.py,
export.py and plot.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, capture_rng_states, check_compatible, latest_checkpoint,
                         load_checkpoint, restore_rng_states, save_checkpoint)
from .config import RESUME_MUST_MATCH

log = logging.getLogger(__name__)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU (FSDP shards are gathered; every rank must call this)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def _gathered_optimizer_state(optimizer) -> dict:
    """The optimizer state with FSDP's sharded moments gathered whole (every rank must call)."""
    state = optimizer.state_dict()
    state["state"] = {k: {n: _full(v) if isinstance(v, torch.Tensor) else v for n, v in entry.items()}
                      for k, entry in state["state"].items()}
    return state


def _shard_optimizer_state(optimizer) -> None:
    """After loading whole moments: give each sharded parameter's state its own shard back."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not hasattr(p, "device_mesh"):
                continue
            from torch.distributed.tensor import distribute_tensor
            entry = optimizer.state.get(p, {})
            for name, value in list(entry.items()):
                if isinstance(value, torch.Tensor) and value.shape == p.shape and not hasattr(value, "device_mesh"):
                    entry[name] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def run_fingerprints(trainer) -> dict:
    return {**trainer.fingerprints, "base_model": trainer.base_fingerprint, "mode": trainer.mode,
            "world_size": trainer.world.size}


def save_run_checkpoint(trainer) -> Path | None:
    """Checkpoint the run (rank 0 writes; every rank takes part in gathering sharded weights)."""
    trainable = {name: _full(p) for name, p in trainer.trained}
    optimizer_state = _gathered_optimizer_state(trainer.optimizer)
    if not trainer.world.is_main:
        return None
    keep = trainer.cfg.keep_checkpoints or None
    path = save_checkpoint(trainer.cfg.out_dir, trainer.step, trainable, optimizer_state,
                           rng_states=capture_rng_states(), data_cursor={"cursor": trainer.cursor},
                           config=trainer.cfg.to_dict(), fingerprints=run_fingerprints(trainer),
                           loss_history=trainer.history, keep_last=keep,
                           extra={"eval_history": trainer.eval_history})
    log.info("checkpoint: %s", path)
    return path


def resume_if_possible(trainer, fresh: bool = False) -> Path | None:
    """Continue from the newest complete checkpoint in the run folder, if there is one."""
    folder = latest_checkpoint(trainer.cfg.out_dir)
    if folder is None:
        return None
    if fresh:
        raise CheckpointError(f"{trainer.cfg.out_dir} already holds a training run (newest checkpoint {folder.name}); "
                              "drop --fresh to continue it, or choose another --out for a new run")
    return resume_from(trainer, folder)


def resume_from(trainer, folder: Path) -> Path:
    """Load one checkpoint (any complete step folder, also of another run folder) into the trainer."""
    state = load_checkpoint(folder)
    # world_size may differ (resuming 4-GPU training on 2 GPUs changes the global batch, so it is refused).
    notes = check_compatible(state, trainer.cfg.to_dict(), run_fingerprints(trainer), RESUME_MUST_MATCH)
    for note in notes:
        log.info("resume: %s", note)
    names = {name for name, _ in trainer.trained}
    if set(state.trainable) != names:
        raise CheckpointError(f"checkpoint {folder} holds other trainable tensors than this run trains "
                              f"(mode {trainer.mode}); resume with the same mode and adapters, or use another --out")
    with torch.no_grad():
        for name, p in trainer.trained:
            src = state.trainable[name]
            if hasattr(p, "full_tensor"):  # FSDP: copy this rank's shard
                from torch.distributed.tensor import distribute_tensor
                src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements)
            p.copy_(src.to(device=p.device, dtype=p.dtype))
    trainer.optimizer.load_state_dict(state.optimizer_state)
    _shard_optimizer_state(trainer.optimizer)
    restore_rng_states(state.rng_states)
    trainer.step = state.step
    trainer.cursor = int(state.data_cursor["cursor"])
    trainer.history = list(state.loss_history)
    trainer.eval_history = list(state.extra.get("eval_history", []))
    log.info("resumed from %s at step %d", folder, state.step)
    return folder


def export_metadata(trainer) -> dict[str, str]:
    cfg = trainer.cfg
    return {"base_model": Path(cfg.wan).name if cfg.wan else "", "base_fingerprint": trainer.base_fingerprint,
            "steps": str(trainer.step), "mode": trainer.mode,
            "dataset_fingerprint": str(trainer.fingerprints.get("dataset", "")),
            "started_from": Path(cfg.adapters).name if cfg.adapters else "fresh initialisation",
            "trainer": "ComfyUI-Lynx lynx_core.train"}


def whole_adapters(trainer):
    """The trained adapters as plain tensors on the CPU: FSDP shards gathered (every rank calls)."""
    adapters = trainer.adapters
    if not any(hasattr(p, "device_mesh") for p in adapters.parameters()):
        return adapters
    import copy
    state = {k: _full(v) for k, v in adapters.state_dict().items()}
    from ..adapters import LynxAdapters
    plain = LynxAdapters(adapters.config)
    from .lora import apply_lora, lora_modules
    mods = lora_modules(adapters)
    if mods:
        first = next(iter(mods.values()))
        apply_lora(plain, rank=first.rank, alpha=first.alpha)
    plain.load_state_dict(state)
    return plain


def export_run(trainer, out: Path | None = None) -> Path | None:
    """The trained adapters (LoRA merged) in the official layout under <out>/adapters/ (rank 0)."""
    from .export import export_adapters
    from .lora import merge_lora
    whole = whole_adapters(trainer)
    if not trainer.world.is_main:
        return None
    merged = merge_lora(whole)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[trainer.cfg.export_dtype]
    target = out or trainer.cfg.out_dir / "adapters" / f"step_{trainer.step:06d}"
    return export_adapters(merged, target, dtype=dtype, metadata=export_metadata(trainer))


def write_plot(trainer) -> Path | None:
    from .plot import loss_plot_png
    if not trainer.history:
        return None
    path = trainer.cfg.out_dir / f"loss_step_{trainer.step:06d}.png"
    loss_plot_png(trainer.history, path, eval_history=trainer.eval_history)
    with open(trainer.cfg.out_dir / "history.json.tmp", "w", encoding="utf-8") as f:
        json.dump({"loss": trainer.history, "eval": trainer.eval_history}, f)
    (trainer.cfg.out_dir / "history.json.tmp").replace(trainer.cfg.out_dir / "history.json")
    return path
