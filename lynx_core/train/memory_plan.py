"""The training memory plan: what goes where on the device and the host, decided before step one.

:func:`plan_training` works from numbers only (the model's and the adapters' shapes, which may be
on ``device="meta"``, and the device and host budgets), so the same arithmetic runs in tests with
pretend 24 / 80 / 141 GB cards. It returns a :class:`TrainPlan` whose :meth:`~TrainPlan.describe`
the trainer prints; a plan that cannot fit raises :class:`TrainPlanError` with the numbers and the
knobs that would make it fit (blocks_to_swap, token_budget, mode, fp8_base, offload_activations,
optimizer).

Where the activation numbers come from (``reference/training.md``): one Wan-14B-shaped Lynx block
(ID and Ref branches) holds about 310 KiB per token during its recompute and backward
(= 31 x dim x 2 bytes in bf16) plus about 33 MiB; each checkpointed block keeps its input,
dim x 2 bytes per token. The trainable state is fp32 master weights (4 B/param) + fp32 gradients
(4) + optimizer state (AdamW 8, 8-bit AdamW 2) + a bf16 compute copy (2) when the blocks compute in
bf16 (autocast keeps one per weight during the step).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
from torch import nn

from ..offload.host import ALIGN, align_up, fmt_bytes, next_pow2, quantizable
from ..offload.plan import _ranges, choose_swapped, estimate_activation_bytes, normalize_device

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20

MODES = ("full", "lora", "id_only", "ref_only")
#: The adapter projections that LoRA mode adapts (their full weights stay frozen).
LORA_TARGETS = ("to_k_ip", "to_v_ip", "to_k_ref", "to_v_ref")
OPTIMIZERS = {"adamw": 8, "adamw8bit": 2}   # optimizer state bytes per trainable parameter
MASTER_BYTES = 4                            # fp32 master weight
GRAD_BYTES = 4                              # fp32 gradient

#: One block's recompute + backward, per token, in units of dim x (compute dtype bytes).
RECOMPUTE_ELEMS_PER_TOKEN = 31
#: ... plus this much at width 5120 (scaled with the width).
RECOMPUTE_FIXED_BYTES_14B = 33 * MiB
#: Outside the blocks, per token in units of dim x dtype bytes: embedded tokens, head input and
#: output, and the gradients flowing through them.
OUTER_ELEMS_PER_TOKEN = 4
#: The allocator never packs temporaries perfectly.
FRAGMENTATION = 1.15
DEFAULT_RESERVE_BYTES = 1 * GiB        # cuBLAS workspaces, NCCL, small tensors, the context's tail
DEFAULT_HOST_RESERVE_BYTES = 8 * GiB   # the process, the dataset shards, the OS
ID_TOKENS = 32                         # 16 face tokens + 16 registers (Lynx-full)
REF_TOKENS = 256                       # 256-px aligned face, one latent frame


class TrainPlanError(ValueError):
    """A training configuration that cannot fit; the message has the numbers and the knobs."""


# ------------------------------------------------------------------------------------------------
# counting
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about the frozen base."""
    num_blocks: int
    dim: int
    ffn_dim: int
    head_dim: int
    block_params: int
    block_device_bytes: int      # one block at the compute dtype, tensors aligned as in the ring
    block_fp8_host_bytes: int    # one block with fp8 matrices (+ row scales), the rest as computed
    block_fp8_extra_bytes: int   # row scales that ride along in a ring slot for an fp8 block
    largest_matrix: int          # elements of the largest 2-D weight (the fp8 staging buffer)
    other_params: int            # embeddings, time projection, head


def model_shape(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
    """Read the shapes of a Wan DiT (original names; ``device="meta"`` is fine)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise TrainPlanError("plan_training needs the Wan model (a module with .blocks); got "
                             f"{type(model).__name__} without blocks")
    s = torch.empty((), dtype=dtype).element_size()
    block = blocks[0]
    params = list(block.parameters())
    dev_b = sum(align_up(p.numel() * s, ALIGN) for p in params)
    host8 = sum((p.numel() + 4 * p.shape[0]) if quantizable(p) else p.numel() * s for p in params)
    extra8 = sum(align_up(4 * p.shape[0], ALIGN) for p in params if quantizable(p))
    largest = max((p.numel() for p in params if p.ndim == 2), default=0)
    try:
        ffn_in = block.ffn[0].weight
        dim, ffn_dim = int(ffn_in.shape[1]), int(ffn_in.shape[0])
    except (AttributeError, IndexError, TypeError):
        raise TrainPlanError("plan_training: the blocks do not have the original Wan names (ffn.0)") from None
    heads = int(getattr(block, "num_heads", 0) or getattr(block.self_attn, "num_heads", 1))
    n_block_params = sum(p.numel() for b in blocks for p in b.parameters())
    other = sum(p.numel() for p in model.parameters()) - n_block_params
    return ModelShape(num_blocks=len(blocks), dim=dim, ffn_dim=ffn_dim, head_dim=dim // heads,
                      block_params=sum(p.numel() for p in params), block_device_bytes=dev_b,
                      block_fp8_host_bytes=host8, block_fp8_extra_bytes=extra8, largest_matrix=largest,
                      other_params=other)


def count_adapter_params(adapters: nn.Module, mode: str, lora_rank: int = 64) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of the adapters in a training mode.

    full: everything trains. lora: rank-``lora_rank`` updates of to_k_ip/to_v_ip/to_k_ref/to_v_ref
    train (their full weights and biases stay frozen) together with the resampler and registers.
    id_only: the resampler and ID-adapter train, the Ref-adapter is frozen. ref_only: the reverse.
    """
    if mode not in MODES:
        raise TrainPlanError(f"mode={mode!r} is unknown; use one of {MODES}")
    if mode == "lora" and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise TrainPlanError(f"lora_rank must be a positive integer (got {lora_rank!r}); 16-128 is usual")
    trainable = frozen = 0
    for name, p in adapters.named_parameters():
        n = p.numel()
        parts = name.split(".")
        if mode == "full":
            trainable += n
        elif mode == "lora":
            if len(parts) >= 2 and parts[-2] in LORA_TARGETS:
                frozen += n
                if parts[-1] == "weight":
                    trainable += lora_rank * (p.shape[0] + p.shape[1])
            else:
                trainable += n
        elif mode == "id_only":
            trainable, frozen = (trainable, frozen + n) if parts[0] == "ref_layers" else (trainable + n, frozen)
        else:  # ref_only
            trainable, frozen = (trainable + n, frozen) if parts[0] == "ref_layers" else (trainable, frozen + n)
    return trainable, frozen


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------

@dataclass
class TrainPlan:
    """Where everything of a training step lives; every size is in bytes."""
    device: str
    mode: str
    tokens: int
    samples: int
    num_blocks: int
    resident: list[int]
    swapped: list[int]
    fp8_base: bool
    offload_activations: bool
    optimizer: str
    lora_rank: int
    trainable_params: int
    frozen_adapter_params: int
    device_bytes: dict[str, int]        # item -> bytes on the device at the step's peak
    host_bytes: dict[str, int]          # item -> bytes of host RAM the plan adds
    peak_bytes: int
    budget_bytes: int
    total_bytes: Optional[int]
    free_bytes: Optional[int]
    reserve_bytes: int
    pinned_bytes: int
    host_ram_bytes: Optional[int]
    host_needed_bytes: int
    placement: str = "spread"
    ring_size: int = 2
    requested: int | str = "auto"
    notes: list[str] = field(default_factory=list)

    @property
    def blocks_to_swap(self) -> int:
        return len(self.swapped)

    @property
    def fits(self) -> bool:
        host_ok = self.host_ram_bytes is None or self.host_needed_bytes <= self.host_ram_bytes
        return self.peak_bytes <= self.budget_bytes and host_ok

    @property
    def swap_options(self) -> dict:
        """Keyword arguments for :meth:`lynx_core.train.swap.SwapRunner.attach`."""
        return {"blocks_to_swap": self.blocks_to_swap, "fp8_base": self.fp8_base,
                "offload_activations": self.offload_activations, "placement": self.placement,
                "ring_size": self.ring_size}

    def describe(self) -> str:
        d, h = self.device_bytes, self.host_bytes
        card = []
        if self.total_bytes is not None:
            card.append(f"{fmt_bytes(self.total_bytes)} total")
        if self.free_bytes is not None:
            card.append(f"{fmt_bytes(self.free_bytes)} free")
        card.append(f"reserve {fmt_bytes(self.reserve_bytes)}")
        mode = f"{self.mode} (rank {self.lora_rank})" if self.mode == "lora" else self.mode
        lines = [f"training memory plan on {self.device} ({', '.join(card)}): mode {mode}, "
                 f"{self.tokens:,} tokens in {self.samples} sample(s) per step"]
        base = (f"  base: {len(self.resident)}/{self.num_blocks} blocks resident "
                f"({fmt_bytes(d['base blocks resident'])})")
        if self.swapped:
            host_kind = "fp8 host copies" if self.fp8_base else "host copies as loaded"
            base += (f", {len(self.swapped)} swapped (blocks {_ranges(self.swapped)}) from {host_kind} "
                     f"({fmt_bytes(h['base masters'])}), ring {fmt_bytes(d['swap ring'])}")
        lines.append(base)
        lines.append(f"  base outside the blocks {fmt_bytes(d['base other parts'])}; frozen adapter weights "
                     f"{fmt_bytes(d['frozen adapter weights'])} ({_count(self.frozen_adapter_params)} params)")
        per = MASTER_BYTES + GRAD_BYTES + OPTIMIZERS[self.optimizer]
        lines.append(f"  trainable {_count(self.trainable_params)} params: fp32 master + grads + "
                     f"{self.optimizer} state ({per} B/param) + compute copy = {fmt_bytes(d['trainable state'])}")
        where = "in pinned host RAM" if self.offload_activations else "on the device"
        lines.append(f"  activations ~{fmt_bytes(d['activations'])}: block checkpoint inputs "
                     f"{fmt_bytes(self._ckpt_bytes)} {where}, one block's recompute+backward "
                     f"{fmt_bytes(self._recompute_bytes)}, outside the blocks {fmt_bytes(self._outer_bytes)} "
                     f"(x{FRAGMENTATION} fragmentation)")
        lines.append(f"  peak device ~{fmt_bytes(self.peak_bytes)} of a {fmt_bytes(self.budget_bytes)} budget"
                     + ("" if self.peak_bytes <= self.budget_bytes else "  << DOES NOT FIT"))
        host = (f"  host RAM: +{fmt_bytes(self.host_needed_bytes)} (masters {fmt_bytes(h['base masters'])}, "
                f"offloaded activations {fmt_bytes(h['offloaded activations'])}, process "
                f"{fmt_bytes(h['process'])}), pinned {fmt_bytes(self.pinned_bytes)}")
        if self.host_ram_bytes is not None:
            host += f" of {fmt_bytes(self.host_ram_bytes)}"
        lines.append(host)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    # filled by the planner, for describe()
    _ckpt_bytes: int = 0
    _recompute_bytes: int = 0
    _outer_bytes: int = 0


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)




@dataclass(frozen=True)
class _Knobs:
    mode: str
    tokens: int
    blocks_to_swap: int | str
    fp8_base: bool
    offload_activations: bool
    optimizer: str


def plan_training(model: nn.Module, adapters: nn.Module, *, tokens: int, mode: str = "full",
                  blocks_to_swap: int | str = "auto", fp8_base: bool = False,
                  offload_activations: bool = False, optimizer: str = "adamw", lora_rank: int = 64,
                  samples: int = 1, text_tokens: int = 512, device: str | torch.device | None = None,
                  device_total_bytes: Optional[int] = None, device_free_bytes: Optional[int] = None,
                  host_ram_bytes: Optional[int] = None, pin_limit_bytes: Optional[int] = None,
                  reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                  host_reserve_bytes: int = DEFAULT_HOST_RESERVE_BYTES,
                  compute_dtype: torch.dtype = torch.bfloat16, ring_size: int = 2,
                  placement: str = "spread") -> TrainPlan:
    """Plan one training step's memory; raise :class:`TrainPlanError` if it cannot fit.

    ``tokens``: transformer tokens per step (the packing token budget), ``samples``: samples packed
    in them (each has its own reference pass, text and adapter keys/values). ``blocks_to_swap``:
    a count or ``"auto"`` (the smallest count that fits; -1 means the same, as in the config).
    ``mode="auto"`` trains everything when it
    fits and falls back to ``lora`` otherwise. Budgets: ``device_free_bytes`` (default: measured on
    CUDA, else ``device_total_bytes``) minus ``reserve_bytes``; ``host_ram_bytes`` (None: not
    checked) minus nothing, with ``host_reserve_bytes`` counted for the process itself.
    """
    if mode == "auto":
        options = dict(tokens=tokens, blocks_to_swap=blocks_to_swap, fp8_base=fp8_base,
                       offload_activations=offload_activations, optimizer=optimizer, lora_rank=lora_rank,
                       samples=samples, text_tokens=text_tokens, device=device,
                       device_total_bytes=device_total_bytes, device_free_bytes=device_free_bytes,
                       host_ram_bytes=host_ram_bytes, pin_limit_bytes=pin_limit_bytes,
                       reserve_bytes=reserve_bytes, host_reserve_bytes=host_reserve_bytes,
                       compute_dtype=compute_dtype, ring_size=ring_size, placement=placement)
        try:
            return plan_training(model, adapters, mode="full", **options)
        except TrainPlanError as err:
            full_needs = str(err).splitlines()[0]
        plan = plan_training(model, adapters, mode="lora", **options)
        plan.notes.append(f"mode 'auto' chose lora: full mode does not fit ({full_needs})")
        return plan

    if optimizer not in OPTIMIZERS:
        raise TrainPlanError(f"optimizer={optimizer!r} is unknown; use one of {sorted(OPTIMIZERS)}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise TrainPlanError(f"token_budget must be a positive number of tokens (got {tokens!r})")
    shape = model_shape(model, compute_dtype)
    n = shape.num_blocks
    if blocks_to_swap == -1:  # the training config's spelling of "auto"
        blocks_to_swap = "auto"
    if not (blocks_to_swap == "auto" or (isinstance(blocks_to_swap, int) and not isinstance(blocks_to_swap, bool)
                                         and 0 <= blocks_to_swap <= n)):
        raise TrainPlanError(f"blocks_to_swap={blocks_to_swap!r}: use a count from 0 to {n} or 'auto'")
    dev = str(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    free = device_free_bytes
    if free is None and device_total_bytes is None and dev.startswith("cuda") and torch.cuda.is_available():
        free, device_total_bytes = torch.cuda.mem_get_info(normalize_device(dev))
    if free is None and device_total_bytes is None:
        raise TrainPlanError("plan_training needs the device memory: pass device_total_bytes (and "
                             "device_free_bytes), or plan on a CUDA device where it can be measured")
    budget = (free if free is not None else device_total_bytes) - reserve_bytes

    ctx = _Context(shape=shape, adapters=adapters, lora_rank=lora_rank, samples=samples, text_tokens=text_tokens,
                   dtype=compute_dtype, ring_size=ring_size, placement=placement, budget=budget,
                   host_ram=host_ram_bytes, pin_limit=pin_limit_bytes, host_reserve=host_reserve_bytes,
                   info=dict(device=dev, total_bytes=device_total_bytes, free_bytes=free, reserve_bytes=reserve_bytes))
    knobs = _Knobs(mode, tokens, blocks_to_swap, bool(fp8_base), bool(offload_activations), optimizer)
    plan = ctx.plan(knobs)
    if plan.fits:
        log.info("%s", plan.describe())
        return plan
    raise TrainPlanError(_refusal(ctx, knobs, plan))


@dataclass
class _Context:
    shape: ModelShape
    adapters: nn.Module
    lora_rank: int
    samples: int
    text_tokens: int
    dtype: torch.dtype
    ring_size: int
    placement: str
    budget: int
    host_ram: Optional[int]
    pin_limit: Optional[int]
    host_reserve: int
    info: dict

    _counts: dict = field(default_factory=dict)

    def counts(self, mode: str) -> tuple[int, int]:
        if mode not in self._counts:
            self._counts[mode] = count_adapter_params(self.adapters, mode, self.lora_rank)
        return self._counts[mode]

    def evaluate(self, k: _Knobs, swapped: list[int]) -> TrainPlan:
        sh, s = self.shape, torch.empty((), dtype=self.dtype).element_size()
        n, dim, L = sh.num_blocks, sh.dim, k.tokens
        trainable, frozen = self.counts(k.mode)
        resident = [b for b in range(n) if b not in swapped]
        ring = 0
        if swapped:
            slot = sh.block_device_bytes + (sh.block_fp8_extra_bytes if k.fp8_base else 0)
            ring = min(self.ring_size, len(swapped)) * slot + (align_up(sh.largest_matrix, ALIGN) if k.fp8_base else 0)
        copy_bytes = s if s < MASTER_BYTES else 0
        per_param = MASTER_BYTES + GRAD_BYTES + OPTIMIZERS[k.optimizer] + copy_bytes
        # activations
        row = L * dim * s
        ckpt_all = n * row
        ckpt_dev = 2 * row if k.offload_activations else ckpt_all
        recompute = L * RECOMPUTE_ELEMS_PER_TOKEN * dim * s + int(RECOMPUTE_FIXED_BYTES_14B * dim / 5120)
        forward = estimate_activation_bytes(L, dim, sh.ffn_dim, self.dtype, context_tokens=self.text_tokens,
                                            head_dim=sh.head_dim, rope_bytes=4)
        per_sample = (self.text_tokens * 2 + n * (3 * REF_TOKENS + 2 * ID_TOKENS)) * dim * s
        outer = OUTER_ELEMS_PER_TOKEN * row + L * (sh.head_dim // 2) * 8 + self.samples * per_sample
        acts = int(FRAGMENTATION * (ckpt_dev + max(recompute, forward) + outer))
        device_bytes = {
            "base blocks resident": len(resident) * sh.block_device_bytes,
            "swap ring": ring,
            "base other parts": sh.other_params * s,
            "frozen adapter weights": frozen * s,
            "trainable state": trainable * per_param,
            "activations": acts,
        }
        masters = len(swapped) * (sh.block_fp8_host_bytes if k.fp8_base else sh.block_device_bytes)
        act_host = n * next_pow2(row) if k.offload_activations else 0  # the caching host allocator rounds up
        host_bytes = {"base masters": masters, "offloaded activations": act_host, "process": self.host_reserve}
        pinned = (masters if self.pin_limit is None else min(masters, self.pin_limit)) + act_host
        plan = TrainPlan(device=self.info["device"], mode=k.mode, tokens=L, samples=self.samples, num_blocks=n,
                         resident=resident, swapped=list(swapped), fp8_base=k.fp8_base,
                         offload_activations=k.offload_activations, optimizer=k.optimizer, lora_rank=self.lora_rank,
                         trainable_params=trainable, frozen_adapter_params=frozen, device_bytes=device_bytes,
                         host_bytes=host_bytes, peak_bytes=sum(device_bytes.values()), budget_bytes=self.budget,
                         total_bytes=self.info["total_bytes"], free_bytes=self.info["free_bytes"],
                         reserve_bytes=self.info["reserve_bytes"], pinned_bytes=pinned, host_ram_bytes=self.host_ram,
                         host_needed_bytes=sum(host_bytes.values()), placement=self.placement,
                         ring_size=self.ring_size, requested=k.blocks_to_swap)
        plan._ckpt_bytes, plan._recompute_bytes, plan._outer_bytes = ckpt_all, max(recompute, forward), outer
        if k.mode == "full" and trainable > 1e9:
            plan.notes.append(f"full mode trains {trainable / 1e9:.2f} B parameters "
                              f"({fmt_bytes(trainable * per_param)} of master weights, gradients and optimizer "
                              "state); mode=lora needs a fraction of it")
        return plan

    def plan(self, k: _Knobs) -> TrainPlan:
        n = self.shape.num_blocks
        if k.blocks_to_swap != "auto":
            return self.evaluate(k, choose_swapped(n, int(k.blocks_to_swap), self.placement))
        last = None
        for count in range(n + 1):
            last = self.evaluate(k, choose_swapped(n, count, self.placement))
            if last.peak_bytes <= self.budget:
                return last
        return last  # all swapped and still over: the caller refuses it


def _refusal(ctx: _Context, k: _Knobs, plan: TrainPlan) -> str:
    """The error text: what does not fit, by how much, and which knobs would fix it."""
    lines = []
    if plan.peak_bytes > plan.budget_bytes:
        lines.append(f"the training plan does not fit on {plan.device}: it needs ~{fmt_bytes(plan.peak_bytes)} "
                     f"of device memory with {plan.blocks_to_swap}/{plan.num_blocks} blocks swapped, and "
                     f"{fmt_bytes(plan.budget_bytes)} is usable (free memory minus a "
                     f"{fmt_bytes(plan.reserve_bytes)} reserve)")
    else:
        lines.append(f"the training plan does not fit in host RAM: it needs ~{fmt_bytes(plan.host_needed_bytes)} "
                     f"(masters {fmt_bytes(plan.host_bytes['base masters'])}, offloaded activations "
                     f"{fmt_bytes(plan.host_bytes['offloaded activations'])}, process "
                     f"{fmt_bytes(plan.host_bytes['process'])}) of {fmt_bytes(plan.host_ram_bytes)}")
    lines.append("  device memory: " + ", ".join(f"{name} {fmt_bytes(b)}" for name, b in plan.device_bytes.items()))
    fixes = []

    def tried(label: str, **change) -> bool:
        alt = ctx.plan(replace(k, **change))
        if alt.fits:
            fixes.append(f"{label} (then {alt.blocks_to_swap} blocks swapped, peak ~{fmt_bytes(alt.peak_bytes)}, "
                         f"host +{fmt_bytes(alt.host_needed_bytes)})")
            return True
        return False

    if k.blocks_to_swap != "auto":
        tried("blocks_to_swap='auto'", blocks_to_swap="auto")
    if k.mode != "lora":
        tried("mode='lora'", mode="lora", blocks_to_swap="auto")
    if not k.offload_activations:
        tried("offload_activations=True", offload_activations=True, blocks_to_swap="auto")
    if not k.fp8_base:
        tried("fp8_base=True", fp8_base=True, blocks_to_swap="auto")
    if k.offload_activations and plan.peak_bytes <= plan.budget_bytes:
        tried("offload_activations=False", offload_activations=False, blocks_to_swap="auto")
    if k.optimizer == "adamw":
        tried("optimizer='adamw8bit' (needs bitsandbytes)", optimizer="adamw8bit", blocks_to_swap="auto")
    best = _max_tokens(ctx, replace(k, blocks_to_swap="auto"))
    if best:
        fixes.append(f"token_budget <= {best:,} (now {k.tokens:,})")
    if not fixes:
        everything = replace(k, mode="lora", offload_activations=True, fp8_base=True, blocks_to_swap="auto")
        combo = ctx.plan(everything)
        if combo.fits:
            fixes.append("mode='lora' with offload_activations=True and fp8_base=True together "
                         f"(then {combo.blocks_to_swap} blocks swapped, peak ~{fmt_bytes(combo.peak_bytes)})")
        else:
            best = _max_tokens(ctx, everything)
            if best:
                fixes.append(f"mode='lora', offload_activations=True, fp8_base=True and token_budget <= {best:,}")
    if fixes:
        lines.append("  any one of these fits: " + "; ".join(fixes))
    else:
        lines.append("  nothing fits on this device: even LoRA mode with every block swapped, fp8 base and offloaded "
                     "activations at the smallest token budget is over; use a larger GPU, Lynx-lite adapters, or "
                     "more host RAM")
    return "\n".join(lines)


def _max_tokens(ctx: _Context, k: _Knobs) -> int:
    """The largest token budget (a multiple of 64) that fits with these knobs; 0 when none does."""
    def ok(t: int) -> bool:
        return ctx.plan(replace(k, tokens=t)).fits
    lo, hi = 0, k.tokens
    if not ok(64):
        return 0
    lo = 64
    while hi - lo > 64:
        mid = (lo + hi) // 2 // 64 * 64
        if mid <= lo:
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo if lo < k.tokens else 0
