"""The container of all Lynx adapter weights: resampler, per-block ID layers, per-block Ref layers."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .errors import LynxAdapterError
from .layers import IPAdapterLayer, RefAdapterLayer
from .resampler import Resampler

VARIANTS = ("full", "lite")

# (width, blocks) -> human name, for error messages that tell the user which base model they picked.
_KNOWN_WAN = {
    (5120, 40): "Wan 14B",
    (1536, 30): "Wan 1.3B",
    (3072, 30): "Wan2.2 5B",
}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def wan_size_name(dim: int, num_blocks: int) -> str:
    return _KNOWN_WAN.get((dim, num_blocks), "not a released Wan size")


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to rebuild the module tree (all of it is recoverable from file shapes
    except the resampler head split, which defaults to the official 64-wide heads)."""

    variant: str
    dim: int
    num_blocks: int
    id_dim: int
    n_registers: int
    ip_bias: bool
    ip_every: int
    with_ref: bool
    resampler_dim: int
    resampler_depth: int
    resampler_heads: int
    resampler_dim_head: int
    num_queries: int
    embedding_dim: int
    ff_mult: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LynxAdapters(nn.Module):
    """Resampler + ``ip_layers`` (keyed by block index) + optional ``ref_layers`` (keyed by block index)."""

    def __init__(self, config: AdapterConfig, device=None, dtype=None) -> None:
        super().__init__()
        if config.variant not in VARIANTS:
            raise LynxAdapterError(f"unknown Lynx variant {config.variant!r}; use one of {VARIANTS}")
        if config.resampler_heads * config.resampler_dim_head <= 0:
            raise LynxAdapterError("resampler heads and dim_head must be positive")
        fk = {"device": device, "dtype": dtype}
        self.config = config
        self.variant = config.variant
        self.dim = config.dim
        self.num_blocks = config.num_blocks
        self.id_dim = config.id_dim
        self.n_registers = config.n_registers
        self.resampler = Resampler(
            dim=config.resampler_dim,
            depth=config.resampler_depth,
            dim_head=config.resampler_dim_head,
            heads=config.resampler_heads,
            num_queries=config.num_queries,
            embedding_dim=config.embedding_dim,
            output_dim=config.id_dim,
            ff_mult=config.ff_mult,
            **fk,
        )
        own_norm = config.variant == "lite"
        self.ip_layers = nn.ModuleDict(
            {
                str(b): IPAdapterLayer(
                    config.dim, config.id_dim, bias=config.ip_bias, n_registers=config.n_registers,
                    own_key_norm=own_norm, **fk,
                )
                for b in range(0, config.num_blocks, config.ip_every)
            }
        )
        self.ref_layers: Optional[nn.ModuleDict] = (
            nn.ModuleDict({str(b): RefAdapterLayer(config.dim, **fk) for b in range(config.num_blocks)})
            if config.with_ref
            else None
        )

    @classmethod
    def create(
        cls,
        variant: str = "full",
        dim: int = 5120,
        num_blocks: int = 40,
        id_dim: Optional[int] = None,
        n_registers: Optional[int] = None,
        resampler_dim: int = 1280,
        resampler_heads: int = 20,
        resampler_dim_head: int = 64,
        resampler_depth: int = 4,
        embedding_dim: int = 512,
        device=None,
        dtype=None,
        *,
        with_ref: Optional[bool] = None,
        num_queries: int = 16,
        ff_mult: int = 4,
    ) -> "LynxAdapters":
        """Randomly initialised adapters shaped like the official ones (or smaller, for tests).

        ``device="meta"`` builds the tree without allocating memory (parameter counting, shape checks).
        ``with_ref`` defaults to True for full and False for lite; lite + Ref is the community mix
        of lite ID layers with the full Ref layers.
        """
        if variant not in VARIANTS:
            raise LynxAdapterError(f"unknown Lynx variant {variant!r}; use 'full' or 'lite'")
        full = variant == "full"
        config = AdapterConfig(
            variant=variant,
            dim=dim,
            num_blocks=num_blocks,
            id_dim=id_dim if id_dim is not None else (dim if full else 2048),
            n_registers=n_registers if n_registers is not None else (16 if full else 0),
            ip_bias=full,
            ip_every=1 if full else 2,
            with_ref=full if with_ref is None else with_ref,
            resampler_dim=resampler_dim,
            resampler_depth=resampler_depth,
            resampler_heads=resampler_heads,
            resampler_dim_head=resampler_dim_head,
            num_queries=num_queries,
            embedding_dim=embedding_dim,
            ff_mult=ff_mult,
        )
        return cls(config, device=device, dtype=dtype)

    # ------------------------------------------------------------------ queries
    @property
    def has_ref(self) -> bool:
        return self.ref_layers is not None

    def ip_block_indices(self) -> list[int]:
        return sorted(int(k) for k in self.ip_layers.keys())

    def ref_block_indices(self) -> list[int]:
        return [] if self.ref_layers is None else sorted(int(k) for k in self.ref_layers.keys())

    def ip_layer(self, block: int) -> Optional[IPAdapterLayer]:
        key = str(block)
        return self.ip_layers[key] if key in self.ip_layers else None

    def ref_layer(self, block: int) -> Optional[RefAdapterLayer]:
        if self.ref_layers is None or str(block) not in self.ref_layers:
            return None
        return self.ref_layers[str(block)]

    def num_params(self, part: Optional[str] = None) -> int:
        """Parameter count of the whole container or of ``'resampler'``, ``'ip_layers'``, ``'ref_layers'``."""
        module = self if part is None else getattr(self, part)
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    def summary(self) -> str:
        ref = f", Ref on {len(self.ref_block_indices())} blocks" if self.has_ref else ", no Ref"
        regs = f", {self.n_registers} registers" if self.n_registers else ""
        return (
            f"Lynx {self.variant}: ID on {len(self.ip_layers)}/{self.num_blocks} blocks "
            f"({self.id_dim}->{self.dim}{regs}){ref}; resampler {self.config.resampler_dim}x"
            f"{self.config.resampler_depth} -> {self.id_dim}; {_count(self.num_params())} params"
        )

    # ------------------------------------------------------------------ maths
    def encode_identity(
        self, embedding: Union[Tensor, np.ndarray, None], batch: int = 1
    ) -> Tensor:
        """ArcFace embedding(s) -> ID tokens ``[B, num_queries, id_dim]``.

        ``None`` is "no identity": the resampler of a zero embedding, exactly as the official
        unconditional pass. Those tokens are not zero (LayerNorm biases, learned latents).
        """
        ref_param = self.resampler.proj_in.weight
        if embedding is None:
            x = torch.zeros(batch, self.config.embedding_dim, device=ref_param.device, dtype=ref_param.dtype)
        else:
            x = torch.from_numpy(np.asarray(embedding)) if isinstance(embedding, np.ndarray) else embedding
            if x.dim() == 1:
                x = x.unsqueeze(0)
            if x.dim() == 3 and x.shape[1] == 1:
                x = x[:, 0]
            if x.dim() != 2 or x.shape[-1] != self.config.embedding_dim:
                raise LynxAdapterError(
                    f"face embedding has shape {list(x.shape)}; Lynx's resampler expects the "
                    f"{self.config.embedding_dim}-d ArcFace embedding ([{self.config.embedding_dim}] or "
                    f"[B, {self.config.embedding_dim}]) from the face encoder"
                )
            if x.shape[0] == 1 and batch > 1:
                x = x.expand(batch, -1)
        return self.resampler(x)

    def check_fits(self, dim: int, num_blocks: int, model_name: str = "model") -> None:
        """Raise unless these adapters were made for a Wan DiT of this width and depth."""
        if dim == self.dim and num_blocks == self.num_blocks:
            return
        ours = wan_size_name(self.dim, self.num_blocks)
        theirs = wan_size_name(dim, num_blocks)
        if (self.dim, self.num_blocks) == (5120, 40):
            fix = "use Wan2.1-T2V-14B or Wan2.2-A14B (low noise)"
        else:
            fix = f"use a Wan model with width {self.dim} and {self.num_blocks} blocks"
        raise LynxAdapterError(
            f"Lynx adapters are for a {self.dim}-wide {self.num_blocks}-block Wan model ({ours}) but the "
            f"{model_name} is {dim}-wide with {num_blocks} blocks ({theirs}); {fix}"
        )
