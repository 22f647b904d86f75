"""One training run of the graph: ComfyUI's MODEL and the encoded dataset into lynx_core's Trainer.

Everything here runs under ``torch.inference_mode(False)`` (ComfyUI executes nodes under
``torch.inference_mode()``, whose tensors cannot be saved for backward): the base's weights are
handed over by :func:`nodes.training_model.engine_model` (cloned only where they are inference
tensors) and the starting adapters are cloned into ordinary tensors.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from lynx_core.adapters import LynxAdapters
from lynx_core.train.checkpoint import latest_checkpoint
from lynx_core.train.checkpoint_io import export_run, resume_from, resume_if_possible, save_run_checkpoint, write_plot
from lynx_core.train.config import TrainConfig
from lynx_core.train.lora import merge_lora
from lynx_core.train import memory_setup
from lynx_core.train.trainer import Trainer

from .training_model import engine_model

log = logging.getLogger(__name__)

RESUME = ("auto", "none")  # plus "<run>/step_NNNNNN": continue that state in a new numbered run folder
BUDGET_CANDIDATES = (33_600, 24_000, 20_000, 16_000, 12_000, 8_000, 4_000)


@dataclass
class RunSettings:
    run_dir: Path
    mode: str = "auto"
    steps: int = 1000
    learning_rate: float = 1e-5
    lora_rank: int = 64
    token_budget: int = 33_600
    blocks_to_swap: int = -1
    save_every: int = 500
    resume: str = "auto"
    seed: int = 0
    variant: str = "full"          # a fresh start's variant (no adapters connected)
    eval_every: int = 0
    base_name: str = "comfyui"     # recorded in the export metadata


@dataclass
class RunOutcome:
    adapters: LynxAdapters          # LoRA merged, detached, on the CPU
    export_dir: Optional[Path]      # None when the run was interrupted
    plot_path: Optional[Path]
    history: list[dict]
    stopped: bool
    trainer: Trainer


def fresh_run_dir(run_dir: Path) -> Path:
    """``resume = none``: the run folder if it holds no training yet, else the next free numbered one."""
    if latest_checkpoint(run_dir) is None and not (run_dir / "adapters").exists():
        return run_dir
    for i in range(1, 10_000):
        candidate = run_dir.with_name(f"{run_dir.name}_{i:03d}")
        if latest_checkpoint(candidate) is None and not candidate.exists():
            log.info("resume = none: %s already holds a run; this one goes to %s", run_dir, candidate)
            return candidate
    raise ValueError(f"run_name: 9999 numbered runs of {run_dir.name} exist; choose another run_name")


def trainable_copy(adapters: Optional[LynxAdapters], variant: str, dim: int, num_blocks: int,
                   seed: int) -> LynxAdapters:
    """Adapters the trainer may own: ordinary (non-inference) fp32 tensors, never the loader's objects."""
    if adapters is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LynxAdapters.create(variant, dim=dim, num_blocks=num_blocks)
    adapters.check_fits(dim, num_blocks, model_name="'model' input")
    out = copy.deepcopy(adapters)  # deep-copies the module tree; the data is replaced just below
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):
            t.data = t.data.to(device="cpu", dtype=torch.float32 if t.is_floating_point() else t.dtype, copy=True)
    return out.requires_grad_(False)


# The GPU plans tried in order when blocks_to_swap = -1: plain block swap, then the 24 GB knobs
# (checkpointed block inputs in pinned host RAM, fp8 host copies of the swapped blocks).
def run_config(settings: RunSettings, run_dir: Path, variant: str, from_graph: bool, device) -> TrainConfig:
    """The engine's TrainConfig for a node run."""
    return TrainConfig(out=str(run_dir), wan=settings.base_name, adapters="from-graph" if from_graph else "",
                       variant=variant, mode=settings.mode, lora_rank=settings.lora_rank, max_steps=settings.steps,
                       lr=settings.learning_rate, token_budget=settings.token_budget, save_every=settings.save_every,
                       seed=settings.seed, eval_every=settings.eval_every, blocks_to_swap=settings.blocks_to_swap,
                       device=str(device), distributed="none", heldout=0.0)


def choose_plan(model, adapters, settings: RunSettings, device, **budgets):
    """The first memory plan that fits these node settings (lynx_core.train.memory_setup)."""
    cfg = run_config(settings, Path("."), adapters.variant, False, device)
    return memory_setup.choose_plan(cfg, model, adapters, device, **budgets)


def preview_image(trainer):
    """PIL image: the x0 the model predicts (left) beside the target (right), first frame, through
    the fixed latent-to-RGB projection (a cheap look, not a VAE decode)."""
    import numpy as np
    from PIL import Image

    from lynx_core.latent_preview import latent_to_rgb
    pred, target = trainer.preview()
    frames = [latent_to_rgb(t[None])[0] for t in (pred, target)]
    return Image.fromarray(np.concatenate(frames, axis=1))


def listed_state(resume: str, root: Path) -> Optional[Path]:
    """The checkpoint folder a listed resume choice ("<run>/step_NNNNNN") names, or None for auto/none."""
    if resume in RESUME:
        return None
    from lynx_core.train.checkpoint import CHECKPOINTS_DIR, is_complete
    run, _, step = resume.partition("/")
    folder = root / run / CHECKPOINTS_DIR / step
    if not run or not step.startswith("step_") or ".." in resume or not is_complete(folder):
        raise ValueError(f"resume: {resume!r} is neither auto, none nor a saved training state; pick auto, none or one of the listed "
                         "<run>/step_N states (refresh the page to update the list)")
    return folder


def auto_token_budget(model, adapters, settings: RunSettings, device: torch.device, source) -> int:
    """token_budget = 0: the largest budget whose memory plan fits (33.6k on the CPU), never smaller
    than the largest sample."""
    from lynx_core.train.memory_plan import TrainPlanError
    largest = max(int(e.tokens) for e in source.entries)
    if device.type != "cuda":
        return max(BUDGET_CANDIDATES[0], largest)
    for tokens in (t for t in BUDGET_CANDIDATES if t >= largest):
        try:
            choose_plan(model, adapters, replace(settings, token_budget=tokens), device)
        except TrainPlanError:
            continue
        log.info("token_budget auto: %d tokens per step", tokens)
        return tokens
    return largest  # the plan's refusal at this size names the knobs


def _export_once(trainer) -> Path:
    """The run's export of this step; an export already there (a finished run queued again) is kept."""
    target = trainer.cfg.out_dir / "adapters" / f"step_{trainer.step:06d}"
    if target.is_dir() and any(target.iterdir()):
        return target
    return export_run(trainer, target)


def train_adapters(model_patcher, source, fixed, settings: RunSettings, *, adapters: Optional[LynxAdapters] = None,
                   device: Optional[torch.device] = None, should_stop: Callable[[], bool] = lambda: False,
                   on_step: Optional[Callable[[dict], None]] = None,
                   preview_every: int = 0, on_preview: Optional[Callable[[int, object], None]] = None,
                   calculate_weight=None) -> RunOutcome:
    """Train; resumes from the run folder's newest checkpoint when ``settings.resume == 'auto'``."""
    state = listed_state(settings.resume, settings.run_dir.parent)
    device = device or torch.device("cpu")
    with torch.inference_mode(False):
        dtype = torch.float32 if device.type == "cpu" else None
        model = engine_model(model_patcher, dtype=dtype, calculate_weight=calculate_weight)
        if dtype is None and model.patch_embedding.weight.dtype == torch.float32:
            model.to(torch.bfloat16)  # a fp32 MODEL on a GPU trains in bf16, as the CLI's default
        cfg_dim, cfg_blocks = model.config.dim, model.config.num_layers
        start = trainable_copy(adapters, settings.variant, cfg_dim, cfg_blocks, settings.seed)
        run_dir = settings.run_dir if settings.resume == "auto" else fresh_run_dir(settings.run_dir)
        if settings.token_budget == 0:
            settings = replace(settings, token_budget=auto_token_budget(model, start, settings, device, source))
        cfg = run_config(settings, run_dir, start.variant, adapters is not None, device)
        memory = memory_setup.setup_memory(cfg, model, start, device, cfg.mode)
        try:
            total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
            trainer = Trainer(cfg, model, start, source, fixed, device=device, runner=memory.runner,
                              reference_runner=memory.reference_runner,
                              fingerprints={"dataset": getattr(source, "fingerprint", "in-memory")},
                              device_bytes=total, mode=memory.mode)
            if settings.resume == "auto":
                resume_if_possible(trainer)
            elif state is not None:
                resume_from(trainer, state)
            already_done = trainer.step >= cfg.max_steps  # queued again after the run finished
            def step_done(record: dict) -> None:
                if on_step is not None:
                    on_step(record)
                if on_preview is not None and preview_every > 0 and record["step"] % preview_every == 0:
                    on_preview(record["step"], preview_image(trainer))

            trainer.fit(should_stop=should_stop, on_step=step_done)
            stopped = trainer.step < cfg.max_steps
            export_dir = plot = None
            if not stopped:
                if not already_done:
                    save_run_checkpoint(trainer)
                trainer.check_base_unchanged()
                export_dir = _export_once(trainer)
            plot = write_plot(trainer)
            merged = merge_lora(trainer.adapters)
            result = copy.deepcopy(merged).to("cpu").requires_grad_(False).eval()
        finally:
            memory.close()
    return RunOutcome(result, export_dir, plot, list(trainer.history), stopped, trainer)
