"""The training loop: data order, per-sample draws, AdamW steps, evaluation, checkpoints, export.

Reproducibility is structural, not best-effort: the data order of epoch e is a permutation seeded
by (seed, e); every sample's noise, sigma and dropout come from a generator seeded by (seed, step,
global pack index, position). A global step consumes ``grad_accum x world_size`` packs, and process
r of a world takes packs r, r + world, ...; so one process with grad_accum = 2 and two processes
with grad_accum = 1 see the same packs with the same draws, and a resumed run continues exactly
where the checkpoint's data cursor points.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .distributed import World, barrier, mean_across, wrap
from .loss import FULL, draw_condition, draw_sigma, noise_sample, sample_generator
from .modes import resolve_mode, set_trainable
from .objective import DrawnSample, LynxObjective
from .packing import plan_packs
from .types import FixedEmbeddings, TrainSample

log = logging.getLogger(__name__)

EVAL_STEP = -1  # the 'step' part of evaluation generators: never a training step


class SampleSource(Protocol):
    """What the trainer reads: a cache (lynx_core.train.cache.TrainCache) or samples in memory."""
    entries: Sequence  # each with .key, .tokens, .heldout

    def sample(self, index: int) -> TrainSample: ...


@dataclass
class MemoryEntry:
    key: str
    tokens: int
    heldout: bool = False


@dataclass
class InMemorySource:
    """Samples already in memory (tests, the tiny demo, the ComfyUI graph's encoded dataset)."""
    samples: list[TrainSample]
    heldout: set[int] = field(default_factory=set)
    fingerprint: str = "in-memory"

    def __post_init__(self):
        if not self.samples:
            raise ValueError("the dataset is empty: no (identity, target, caption) samples to train on")
        self.entries = [MemoryEntry(s.key or f"sample{i}", s.tokens(), i in self.heldout)
                        for i, s in enumerate(self.samples)]

    def sample(self, index: int) -> TrainSample:
        return self.samples[index]


class TrainingError(ValueError):
    """The run cannot start or continue as configured; the message says why and what to change."""


class DataOrder:
    """Packs of sample indices, epoch after epoch, addressed by a global pack number (the cursor)."""

    def __init__(self, source: SampleSource, budget: int, seed: int):
        self.train = [i for i, e in enumerate(source.entries) if not e.heldout]
        if not self.train:
            raise TrainingError("every sample is held out for evaluation; lower `heldout` or add data")
        self.tokens = [source.entries[i].tokens for i in range(len(source.entries))]
        self.keys = [source.entries[i].key for i in range(len(source.entries))]
        self.budget = budget
        self.seed = seed
        self._epochs: dict[int, list[list[int]]] = {}
        self._lengths: dict[int, int] = {}

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            order = [self.train[i] for i in torch.randperm(len(self.train), generator=g).tolist()]
            packs = plan_packs([self.tokens[i] for i in order], self.budget, keys=[self.keys[i] for i in order])
            for old in [k for k in self._epochs if k != e][:-3]:  # keep a few recent epochs
                del self._epochs[old]
            self._epochs[e] = [[order[j] for j in pack] for pack in packs]
            self._lengths[e] = len(packs)
        return self._epochs[e]

    def _length(self, e: int) -> int:
        return self._lengths[e] if e in self._lengths else len(self.epoch(e))

    def pack(self, cursor: int) -> tuple[int, list[int]]:
        """(epoch, sample indices) of global pack number ``cursor``."""
        e = 0
        while cursor >= self._length(e):
            cursor -= self._length(e)
            e += 1
        return e, self.epoch(e)[cursor]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("optimizer = \"adamw8bit\" needs bitsandbytes (pip install bitsandbytes); "
                                "or use optimizer = \"adamw\"") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay)
    # foreach=False: one kernel order on every device count, so DDP runs equal single-process runs.
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, foreach=False)


class Trainer:
    """Trains ``adapters`` (fp32 master weights) against a frozen ``model`` on ``source``."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, adapters: nn.Module, source: SampleSource,
                 fixed: FixedEmbeddings, *, device: torch.device, world: World | None = None,
                 runner=None, reference_runner=None, fingerprints: dict | None = None,
                 device_bytes: int | None = None, packed: bool = True, mode: str | None = None,
                 on_log: Callable[[dict], None] | None = None):
        from .runner import plain_runner
        self.cfg = cfg
        self.model = model
        self.device = device
        self.world = world or World()
        self.source = source
        self.fixed = fixed.to(device)
        self.fingerprints = dict(fingerprints or {})
        self.on_log = on_log
        self.step = 0
        self.cursor = 0
        self.history: list[dict] = []
        self.eval_history: list[dict] = []

        model.requires_grad_(False)
        self.base_fingerprint = _state_fingerprint(model)
        choice = resolve_mode(mode or cfg.mode, adapters, device_bytes, cfg.optimizer)
        self.mode = choice.mode
        log.info("training mode %s (%s)", self.mode, choice.reason)
        # Frozen adapter weights (the projections under a LoRA, the untrained part of id_only /
        # ref_only) run in the base's dtype; what trains is fp32 master weights, since bf16
        # updates vanish at lr 1e-5. Lynx-full's frozen projections in bf16 save 8.5 GB.
        base_dtype = model.patch_embedding.weight.dtype
        adapters.to(device=device, dtype=base_dtype if self.mode != "full" else torch.float32)
        adapters.train()
        g = torch.Generator().manual_seed(cfg.seed)
        self.trained = set_trainable(adapters, self.mode, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                     generator=g)
        with torch.no_grad():
            for _, p in self.trained:
                p.data = p.data.to(device=device, dtype=torch.float32)
        self.adapters = adapters
        self.params = [p for _, p in self.trained]
        n = sum(p.numel() for p in self.params)
        log.info("training %d tensors, %.2f M parameters", len(self.params), n / 1e6)
        self.objective = LynxObjective(adapters, model, self.fixed, runner=runner or plain_runner,
                                       reference_runner=reference_runner, packed=packed,
                                       attention=cfg.attention)
        self.engine = wrap(self.objective, self.world, cfg.distributed, device)
        # FSDP replaces the parameters with sharded ones: the optimizer must see those.
        names = [n for n, _ in self.trained]
        current = dict(adapters.named_parameters())
        self.trained = [(n, current[n]) for n in names]
        self.params = [p for _, p in self.trained]
        self.optimizer = make_optimizer(self.params, cfg)
        self.data = DataOrder(source, cfg.token_budget, cfg.seed)
        heldout = [i for i, e in enumerate(source.entries) if e.heldout]
        self.heldout = heldout

    # -- draws --------------------------------------------------------------------------------------
    def draw(self, indices: list[int], step: int, pack_number: int) -> list[DrawnSample]:
        cfg = self.cfg
        out = []
        for pos, i in enumerate(indices):
            g = sample_generator(cfg.seed, step, pack_number, pos)
            sigma = draw_sigma(g, cfg.timestep_sampling, cfg.shift, cfg.logit_mean, cfg.logit_std)
            condition = draw_condition(g, cfg.drop_id, cfg.drop_text, cfg.drop_both)
            sample = self.source.sample(i)
            out.append(DrawnSample(sample, noise_sample(sample.latent, sigma, g), condition))
        return out

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, world = self.cfg, self.world
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        losses, tokens, samples = [], 0, 0
        for m in range(cfg.grad_accum):
            number = self.cursor + m * world.size + world.rank
            _epoch, indices = self.data.pack(number)
            drawn = self.draw(indices, self.step, number)
            last = m == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not hasattr(self.engine, "no_sync")) else self.engine.no_sync()
            with sync:
                loss, _per = self.engine(drawn, self.device)
                (loss / cfg.grad_accum).backward()
            losses.append(float(loss.detach()))
            tokens += sum(self.source.entries[i].tokens for i in indices)
            samples += len(indices)
        grad_norm = None
        if cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        self.optimizer.step()
        self.cursor += cfg.grad_accum * world.size
        self.step += 1
        record = {"step": self.step, "loss": mean_across(sum(losses) / len(losses), world, self.device),
                  "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                  "tokens": tokens, "samples": samples, "seconds": round(time.perf_counter() - t0, 4),
                  "epoch": self.data.pack(self.cursor)[0]}
        self.history.append(record)
        return record

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, indices: Sequence[int] | None = None, identity_of: Sequence[int] | None = None) -> float:
        """Loss at the fixed sigmas on held-out samples (or ``indices``), with fixed noise.

        ``identity_of[j]`` gives the sample whose face (embedding and reference) sample ``indices[j]``
        is conditioned on: the identity-shuffle control of the synthetic identity test.
        """
        indices = list(self.heldout if indices is None else indices)
        if not indices:
            return float("nan")
        was_training = self.adapters.training
        self.adapters.eval()
        total, count = 0.0, 0
        try:
            for k, sigma in enumerate(self.cfg.eval_sigmas):
                drawn = []
                for j, i in enumerate(indices):
                    s = self.source.sample(i)
                    if identity_of is not None:
                        other = self.source.sample(identity_of[j])
                        s = TrainSample(s.latent, s.text, other.face_embedding, other.ref_latent, s.key)
                    g = sample_generator(self.cfg.seed, EVAL_STEP, k, i)
                    drawn.append(DrawnSample(s, noise_sample(s.latent, sigma, g), FULL))
                for start in range(0, len(drawn), 8):
                    chunk = drawn[start:start + 8]
                    loss, _ = self.objective(chunk, self.device)
                    total += float(loss) * len(chunk)
                    count += len(chunk)
        finally:
            self.adapters.train(was_training)
        return total / count

    @torch.no_grad()
    def preview(self, index: int | None = None, sigma: float = 0.75) -> tuple[Tensor, Tensor]:
        """(x0 predicted at a fixed sigma, the target x0) of one sample, latents [16, F, h, w] fp32.

        A cheap look at what the adapters do (one forward of one sample): x0 = x_t - sigma * v.
        """
        i = index if index is not None else (self.heldout[0] if self.heldout else self.data.train[0])
        s = self.source.sample(i)
        noised = noise_sample(s.latent, sigma, sample_generator(self.cfg.seed, EVAL_STEP, -2, i))
        v = self.objective.predict([DrawnSample(s, noised, FULL)], self.device)[0].float().cpu()
        return noised.x_t - sigma * v, s.latent.float()

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None, should_stop: Callable[[], bool] | None = None,
            on_step: Callable[[dict], None] | None = None) -> list[dict]:
        """Train until ``max_steps`` (default: the config's), saving and evaluating on schedule."""
        from .checkpoint_io import save_run_checkpoint
        cfg = self.cfg
        target = cfg.max_steps if max_steps is None else max_steps
        while self.step < target:
            if should_stop is not None and should_stop():
                log.info("stopped at step %d; saving a checkpoint to resume from", self.step)
                save_run_checkpoint(self)
                break
            record = self.train_step()
            if cfg.eval_every and self.heldout and self.step % cfg.eval_every == 0:
                value = self.eval_loss()
                self.eval_history.append({"step": self.step, "eval_loss": value})
                record["eval_loss"] = value
            if self.world.is_main and (self.step % max(1, cfg.log_every) == 0 or self.step == 1):
                log.info("step %d  loss %.5f  lr %.3g%s", self.step, record["loss"], record["lr"],
                         f"  eval {record['eval_loss']:.5f}" if "eval_loss" in record else "")
            if on_step is not None:
                on_step(record)
            if self.on_log is not None:
                self.on_log(record)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < target:
                save_run_checkpoint(self)
        return self.history

    def check_base_unchanged(self) -> None:
        if _state_fingerprint(self.model) != self.base_fingerprint:
            raise RuntimeError("the frozen base model changed during training (a bug); do not use its weights")


def _state_fingerprint(model: nn.Module) -> str:
    """Cheap content fingerprint of a module's weights (sum and a strided sample of each tensor)."""
    import hashlib
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            probe = flat[:: max(1, flat.numel() // 64)].float().cpu()
            h.update(name.encode())
            h.update(probe.numpy().tobytes())
            h.update(json.dumps(float(flat.float().sum())).encode())
    return h.hexdigest()
