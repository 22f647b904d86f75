"""LoRA (low-rank updates) on the adapter projections to_k_ip, to_v_ip, to_k_ref, to_v_ref.

Lynx-full's ID and Ref projections are 5120 x 5120 per block (4.2 B of its 4.28 B parameters);
training a rank-r update ``W + (alpha / r) * B @ A`` instead keeps the fp32 master weights and
AdamW state small enough for one 24 GB GPU. ``LoRALinear`` subclasses ``nn.Linear`` and keeps
the original ``weight``/``bias`` under their names, so ``key_value()`` and every reader of
``.weight`` keep working, and the base part of the state dict keeps the official keys.
``merge_lora`` folds the update back into plain ``nn.Linear`` weights before saving, so a saved
file has the official layout with no LoRA keys.
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import LynxAdapters

logger = logging.getLogger(__name__)

# The projections a LoRA is put on; everything else (resampler, registers, biases) stays as it is.
LORA_TARGETS = {"ip_layers": ("to_k_ip", "to_v_ip"), "ref_layers": ("to_k_ref", "to_v_ref")}


class LoRAError(ValueError):
    """A LoRA request or LoRA state that does not fit the adapters; the message says what to do."""


class LoRALinear(nn.Linear):
    """``y = x W^T + b + scale * ((x A^T) B^T)`` with W, b frozen and A ``[r, in]``, B ``[out, r]`` in fp32.

    The low-rank path runs in fp32 (the master precision; at lr 1e-5 bf16 updates vanish) and is
    cast back to the input dtype, so the module still takes and returns its own dtype.
    B starts at zero: before the first update the output equals the wrapped Linear exactly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None) -> None:
        # Built on meta so nothing is allocated; the base parameters are then shared, not copied.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        device = base.weight.device
        # Same distribution as nn.Linear's default init (kaiming-uniform, a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
        # Drawn on the CPU from the handed-in generator so the draw is the same on every device.
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.rand(self.rank, self.in_features, generator=generator, dtype=torch.float32) * (2 * bound) - bound
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=torch.float32, device=device))

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` in fp32, the shape of ``weight``."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        low = F.linear(F.linear(x.to(torch.float32), self.lora_A), self.lora_B) * self.scale
        return out + low.to(out.dtype)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + scale * B @ A`` (in the weight's dtype) and the same bias."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            w = (self.weight.to(torch.float32) + self.delta_weight()).to(self.weight.dtype)
        plain.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach(), requires_grad=False)
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def _targets(adapters: LynxAdapters) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, owning layer, attribute) of every LoRA target, in a fixed order (so seeded A is reproducible)."""
    for part, names in LORA_TARGETS.items():
        layers = getattr(adapters, part)
        if layers is None:
            continue
        for block in sorted(layers.keys(), key=int):
            for name in names:
                yield f"{part}.{block}.{name}", layers[block], name


def lora_modules(adapters: LynxAdapters) -> dict[str, LoRALinear]:
    """The wrapped projections by qualified name (``ip_layers.0.to_k_ip`` ...); empty when there is no LoRA."""
    return {q: getattr(layer, name) for q, layer, name in _targets(adapters) if isinstance(getattr(layer, name), LoRALinear)}


def has_lora(adapters: LynxAdapters) -> bool:
    return bool(lora_modules(adapters))


def apply_lora(
    adapters: LynxAdapters,
    rank: int,
    alpha: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> list[nn.Parameter]:
    """Wrap to_k_ip/to_v_ip/to_k_ref/to_v_ref of every adapter layer in a ``LoRALinear``, in place.

    Returns the new trainable LoRA parameters (A, B per projection, in a fixed order). The wrapped
    weights and biases are frozen; the resampler and the registers are left as they are (the
    trainer decides whether they train). ``alpha`` defaults to ``rank`` (scale 1). Pass a seeded
    CPU ``torch.Generator`` to make A reproducible.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}; set lora_rank to e.g. 16, 32 or 64")
    if has_lora(adapters):
        raise LoRAError("these adapters already carry LoRA layers; call apply_lora once per adapter set "
                        "(or merge_lora(adapters, inplace=True) first to fold the old one in)")
    targets = list(_targets(adapters))
    if not targets:
        raise LoRAError("these adapters have no to_k_ip/to_v_ip/to_k_ref/to_v_ref projections to put a LoRA on")
    max_rank = min(min(getattr(layer, name).in_features, getattr(layer, name).out_features) for _, layer, name in targets)
    if rank > max_rank:
        raise LoRAError(
            f"LoRA rank {rank} is larger than the smallest projection ({max_rank} wide), where a low-rank "
            f"update stops being low-rank; use lora_rank <= {max_rank} or the 'full' training mode"
        )
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise LoRAError(f"LoRA alpha must be a positive number, got {alpha!r}; leave it unset to use alpha = rank")
    alpha = float(rank if alpha is None else alpha)
    if generator is not None and generator.device.type != "cpu":
        raise LoRAError("the LoRA generator must be a CPU torch.Generator (A is drawn on the CPU, then moved)")
    params: list[nn.Parameter] = []
    for _, layer, name in targets:
        base = getattr(layer, name)
        if base.weight.is_meta:
            raise LoRAError("cannot put a LoRA on adapters built on the meta device; load or initialise their weights first")
        wrapped = LoRALinear(base, rank, alpha, generator)
        setattr(layer, name, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    logger.info("LoRA rank %d alpha %g on %d projections: %d trainable parameters",
                rank, alpha, len(targets), sum(p.numel() for p in params))
    return params


def lora_num_params(adapters: LynxAdapters, rank: int) -> int:
    """Parameters a rank-``rank`` LoRA would add (``rank * (in + out)`` per projection); works on meta adapters, for planning."""
    return sum(rank * (getattr(layer, name).in_features + getattr(layer, name).out_features)
               for _, layer, name in _targets(adapters))


def lora_parameters(adapters: LynxAdapters) -> list[nn.Parameter]:
    """The LoRA parameters in the same order ``apply_lora`` returned them."""
    out: list[nn.Parameter] = []
    for module in lora_modules(adapters).values():
        out += [module.lora_A, module.lora_B]
    return out


def lora_settings(adapters: LynxAdapters) -> dict[str, float]:
    """``{'rank': r, 'alpha': a}`` of the LoRA on these adapters (JSON-able, for checkpoints and metadata)."""
    modules = list(lora_modules(adapters).values())
    if not modules:
        raise LoRAError("these adapters carry no LoRA; call apply_lora first")
    return {"rank": modules[0].rank, "alpha": modules[0].alpha}


def lora_state(adapters: LynxAdapters) -> dict[str, Tensor]:
    """``{'ip_layers.0.to_k_ip.lora_A': A, ...}``: detached LoRA tensors (the base weights are not in it)."""
    out: dict[str, Tensor] = {}
    for qual, module in lora_modules(adapters).items():
        out[f"{qual}.lora_A"] = module.lora_A.detach()
        out[f"{qual}.lora_B"] = module.lora_B.detach()
    if not out:
        raise LoRAError("these adapters carry no LoRA; call apply_lora first")
    return out


def load_lora_state(adapters: LynxAdapters, state: Mapping[str, Tensor]) -> None:
    """Copy a ``lora_state`` into the LoRA parameters of ``adapters`` (same keys and shapes, or a clear error)."""
    modules = lora_modules(adapters)
    if not modules:
        raise LoRAError("these adapters carry no LoRA; call apply_lora with the checkpoint's rank before loading its LoRA state")
    expected = {f"{q}.{p}": getattr(m, p) for q, m in modules.items() for p in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LoRAError(
            f"the LoRA state does not fit these adapters: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); it was saved for another adapter "
            f"variant or block count: resume with the adapters it was trained on"
        )
    for key, param in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(param.shape):
            raise LoRAError(
                f"LoRA tensor {key} has shape {list(value.shape)} but these adapters expect {list(param.shape)}; "
                f"the checkpoint was trained with another lora_rank: set lora_rank to {_rank_of(key, value)}"
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])


def _rank_of(key: str, value: Tensor) -> int:
    return int(value.shape[0] if key.endswith("lora_A") else value.shape[-1])


def merge_lora(adapters: LynxAdapters, inplace: bool = False) -> LynxAdapters:
    """Adapters with plain ``nn.Linear`` projections holding ``W + scale * B @ A``: the official layout.

    ``inplace=False`` (default) returns a new container and leaves ``adapters`` training; it shares
    every unchanged tensor with ``adapters`` (no copy), so only the merged projections cost memory.
    Treat it as read-only (export it, evaluate with it). ``inplace=True`` replaces the wrapped
    projections of ``adapters`` itself and returns it. Adapters without LoRA are returned as they are.
    """
    modules = lora_modules(adapters)
    if not modules:
        return adapters
    if inplace:
        for qual, module in modules.items():
            part, block, name = qual.split(".")
            setattr(getattr(adapters, part)[block], name, module.merged())
        return adapters
    merged = {f"{qual}.{p}": t for qual, module in modules.items() for p, t in _plain_tensors(module.merged())}
    state: dict[str, Tensor] = {}
    for key, tensor in adapters.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        state[key] = merged.get(key, tensor)
    copy = LynxAdapters(adapters.config, device="meta")
    copy.load_state_dict(state, strict=True, assign=True)
    copy.train(adapters.training)
    copy.requires_grad_(False)
    return copy


def _plain_tensors(linear: nn.Linear) -> list[tuple[str, Tensor]]:
    out = [("weight", linear.weight.detach())]
    if linear.bias is not None:
        out.append(("bias", linear.bias.detach()))
    return out
