"""A whole training run from a TrainConfig: load, resume, train, checkpoint, export, plot.

This is what ``python -m lynx_core train CONFIG`` runs, unchanged under ``torchrun`` /
``accelerate launch``. Ctrl-C stops after the current step with a checkpoint (a second Ctrl-C
aborts at once; the last checkpoint stays intact either way).
"""
from __future__ import annotations

import json
import logging
import signal
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import TrainConfig
from .distributed import World, barrier, close_world, init_world
from .memory_setup import setup_memory
from .trainer import InMemorySource, Trainer, TrainingError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class RunResult:
    trainer: Trainer
    adapters_path: Path | None
    plot_path: Path | None
    stopped_early: bool


def resolve_device(name: str, world: World) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device = {name!r} but no CUDA GPU is visible; use device = \"cpu\" or \"auto\"")
        if device.index is None:
            device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def load_models(cfg: TrainConfig, device: torch.device):
    """The frozen base and the adapters to train (released ones, or a fresh initialisation)."""
    from ..adapters import LynxAdapters, load_adapters
    from .synthetic import tiny_models
    dtype = DTYPES[cfg.dtype] if device.type == "cuda" else torch.float32
    if cfg.wan == "tiny":
        model, fresh = tiny_models(cfg.seed, cfg.variant)
    else:
        from ..wan.checkpoint import load_wan
        model = load_wan(cfg.wan, dtype=dtype, device="cpu")
        fresh = None
    model.requires_grad_(False).eval()
    dim, blocks = model.config.dim, model.config.num_layers
    if cfg.adapters:
        adapters = load_adapters(cfg.adapters, dtype=torch.float32, dim=dim, num_blocks=blocks)
    elif fresh is not None:
        adapters = fresh
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            adapters = LynxAdapters.create(cfg.variant, dim=dim, num_blocks=blocks)
    if cfg.resampler_init:
        load_resampler_init(adapters, Path(cfg.resampler_init))
    return model, adapters


def load_resampler_init(adapters, path: Path) -> None:
    """Initialise the resampler from a file of the same shape (InstantID's fits Lynx-lite)."""
    from safetensors.torch import load_file
    if not path.is_file():
        raise TrainingError(f"resampler_init {path} does not exist")
    state = load_file(str(path))
    # InstantID-style files may prefix keys; keep the part after a known prefix.
    state = {k.split("image_proj.", 1)[-1].split("resampler.", 1)[-1]: v for k, v in state.items()}
    own = adapters.resampler.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = [f"{k}: file {list(state[k].shape)} vs adapters {list(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        detail = "; ".join(wrong[:3]) or f"missing keys {missing[:4]}"
        raise TrainingError(f"resampler_init {path} does not fit this resampler ({detail}); "
                            "use a resampler file of the same shape (InstantID's fits Lynx-lite only)")
    adapters.resampler.load_state_dict({k: state[k].float() for k in own})


SYNTHETIC = "synthetic"  # dataset = "synthetic": the built-in synthetic identity task (tests, demos)


def synthetic_source(seed: int):
    from .synthetic import synthetic_identities
    samples, heldout, fixed = synthetic_identities(seed=seed)
    return InMemorySource(samples, heldout, fingerprint=f"synthetic-identities-seed{seed}"), fixed


def load_source(cfg: TrainConfig, device, world: World):
    """(source, fixed embeddings, fingerprints): the built-in synthetic set, or the dataset's cache
    (built once with the standalone encoders)."""
    if cfg.dataset == SYNTHETIC:
        source, fixed = synthetic_source(cfg.seed)
        return source, fixed, {"dataset": source.fingerprint}
    if not cfg.dataset:
        raise TrainingError("dataset is not set: give a dataset folder (see docs/training.md) or "
                            "dataset = \"synthetic\" for the built-in test task")
    from .standalone_data import build_or_open_cache
    return build_or_open_cache(cfg, device, world)


@contextmanager
def stop_on_sigint() -> Iterator[list[bool]]:
    flag = [False]
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag[0]:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag[0] = True
        log.warning("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort now)")

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield flag
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        except ValueError:
            pass


def run_training(cfg: TrainConfig, *, source=None, fixed=None, models=None, fresh: bool = False) -> RunResult:
    """Train as configured; resumes from the newest checkpoint in ``cfg.out`` unless ``fresh``."""
    from .checkpoint_io import export_run, resume_if_possible, save_run_checkpoint, write_plot
    stack = ExitStack()
    world = init_world(torch.device("cuda" if cfg.device.startswith("cuda") or
                                    (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"),
                       cfg.distributed)
    try:
        device = resolve_device(cfg.device, world)
        model, adapters = models if models is not None else load_models(cfg, device)
        if source is None:
            source, fixed, fingerprints = load_source(cfg, device, world)
        else:
            fingerprints = {"dataset": getattr(source, "fingerprint", "in-memory")}
        memory = setup_memory(cfg, model, adapters, device, cfg.mode)
        stack.callback(memory.close)
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        trainer = Trainer(cfg, model, adapters, source, fixed, device=device, world=world, runner=memory.runner,
                          reference_runner=memory.reference_runner, fingerprints=fingerprints, device_bytes=total,
                          mode=memory.mode)
        resume_if_possible(trainer, fresh=fresh)
        stopped = False
        with stop_on_sigint() as flag:
            trainer.fit(should_stop=lambda: flag[0])
            stopped = flag[0] and trainer.step < cfg.max_steps
        if not stopped:
            save_run_checkpoint(trainer)
        trainer.check_base_unchanged()
        path = export_run(trainer)  # every rank: FSDP gathers the shards
        plot = write_plot(trainer) if world.is_main else None
        barrier(world)
        return RunResult(trainer, path, plot, stopped)
    finally:
        stack.close()
        close_world(world)


def tiny_demo(out: Path, steps: int = 150, seed: int = 0) -> RunResult:
    """Train the tiny random model on the built-in synthetic identities (CPU, well under 2 minutes)."""
    from .synthetic import shuffled_identities, tiny_models
    source, fixed = synthetic_source(seed)
    samples, heldout = source.samples, source.heldout
    cfg = TrainConfig(out=str(out), wan="tiny", dataset=SYNTHETIC, mode="full", lr=2e-3, weight_decay=0.0, max_steps=steps,
                      token_budget=64, eval_every=max(1, steps // 5), save_every=0, seed=seed, device="cpu",
                      warmup_steps=10, log_every=max(1, steps // 10), grad_clip=1.0, distributed="none")
    models = tiny_models(seed)
    start = _eval_pair(cfg, models, source, fixed, heldout, samples, shuffled_identities)
    result = run_training(cfg, source=source, fixed=fixed, models=models)
    tr = result.trainer
    idx = sorted(heldout)
    right, shuffled = tr.eval_loss(idx), tr.eval_loss(idx, shuffled_identities(samples, idx))
    first, last = tr.history[0]["loss"], sum(r["loss"] for r in tr.history[-10:]) / min(10, len(tr.history))
    print(f"tiny demo: training loss {first:.4f} at step 1 -> {last:.4f} (mean of the last 10 steps)")
    print(f"held-out loss at fixed t: right identity {right:.4f}, shuffled identities {shuffled:.4f} "
          f"(before training: {start[0]:.4f} / {start[1]:.4f})")
    print(f"adapters (official layout): {result.adapters_path}")
    print(f"loss plot: {result.plot_path}")
    return result


def _eval_pair(cfg, models, source, fixed, heldout, samples, shuffle):
    """Right vs shuffled identity eval loss of the untrained adapters (a throwaway copy)."""
    import copy
    model, adapters = models
    probe = Trainer(cfg, model, copy.deepcopy(adapters), source, fixed, device=torch.device("cpu"))
    idx = sorted(heldout)
    return probe.eval_loss(idx), probe.eval_loss(idx, shuffle(samples, idx))


def main_train(args) -> int:
    if args.tiny_demo:
        if args.out is None:
            raise TrainingError("--tiny-demo needs --out DIR (where the adapters and the loss plot go)")
        tiny_demo(Path(args.out), steps=args.max_steps or 150)
        return 0
    if args.config is None:
        raise TrainingError("give a training config (TOML or JSON; see docs/training.md) or --tiny-demo --out DIR")
    cfg = TrainConfig.load(args.config, out=args.out, max_steps=args.max_steps)
    result = run_training(cfg, fresh=args.fresh)
    if result.trainer.world.is_main:
        print(json.dumps({"steps": result.trainer.step, "adapters": str(result.adapters_path),
                          "plot": str(result.plot_path), "stopped_early": result.stopped_early}))
    return 0


def build_parser(p) -> None:
    p.add_argument("config", nargs="?", type=Path, help="training config (.toml or .json)")
    p.add_argument("--out", help="run folder (overrides the config's `out`)")
    p.add_argument("--max-steps", type=int, help="train to this step (overrides the config)")
    p.add_argument("--fresh", action="store_true",
                   help="refuse to continue an existing run in --out (default: resume from its newest checkpoint)")
    p.add_argument("--tiny-demo", action="store_true",
                   help="train the built-in tiny random model on synthetic identities (CPU, < 2 min)")
