"""Per-block adapter layers: ID-adapter (IP) keys/values and Ref-adapter keys/values.

The layers only make keys and values; the attention itself (and adding ``scale * A`` before the
block's ``to_out``) belongs to the Lynx block code. Keeping K/V separate lets the engine compute
them once per generation, since they depend only on the face, not on the denoising step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

NormFn = Callable[[Tensor], Tensor]

LITE_KEY_NORM_EPS = 1e-5


class RMSNormNoAffine(nn.Module):
    """Parameter-free RMSNorm (lite IP key norm): variance in fp32, result in the input dtype."""

    def __init__(self, eps: float = LITE_KEY_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class IPAdapterLayer(nn.Module):
    """ID-adapter projections for one block's text cross-attention.

    full: ``Linear(id_dim -> dim, bias)`` + ``registers [1, R, id_dim]``, keys normed by the
    block's own ``cross_attn.norm_k``. lite: no bias, no registers, keys normed by a
    parameter-free RMSNorm (eps 1e-5) owned by the layer.
    """

    def __init__(
        self,
        dim: int,
        id_dim: int,
        bias: bool = True,
        n_registers: int = 0,
        own_key_norm: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.dim = dim
        self.id_dim = id_dim
        self.n_registers = n_registers
        self.own_key_norm = own_key_norm
        self.to_k_ip = nn.Linear(id_dim, dim, bias=bias, **fk)
        self.to_v_ip = nn.Linear(id_dim, dim, bias=bias, **fk)
        if n_registers > 0:
            # Official init divides by sqrt of the block width, not of id_dim.
            self.registers: Optional[nn.Parameter] = nn.Parameter(
                torch.randn(1, n_registers, id_dim, **fk) / math.sqrt(dim)
            )
        else:
            self.register_parameter("registers", None)
        self.norm_k_ip: Optional[RMSNormNoAffine] = RMSNormNoAffine() if own_key_norm else None

    def tokens_with_registers(self, tokens: Tensor) -> Tensor:
        """``[B, N, id_dim]`` -> ``[B, N + R, id_dim]``; registers go after the face tokens."""
        if self.registers is None:
            return tokens
        regs = self.registers.to(device=tokens.device, dtype=tokens.dtype)
        return torch.cat([tokens, regs.expand(tokens.shape[0], -1, -1)], dim=1)

    def key_value(self, tokens: Tensor, block_norm_k: Optional[NormFn]) -> tuple[Tensor, Tensor]:
        if tokens.dim() != 3 or tokens.shape[-1] != self.id_dim:
            raise ValueError(
                f"ID tokens must be [B, N, {self.id_dim}] (the resampler output for this adapter), "
                f"got {list(tokens.shape)}"
            )
        tokens = tokens.to(dtype=self.to_k_ip.weight.dtype)
        tokens = self.tokens_with_registers(tokens)
        if self.norm_k_ip is not None:
            norm = self.norm_k_ip
        elif block_norm_k is not None:
            norm = block_norm_k
        else:
            raise ValueError("full ID-adapter keys are normed by the block's cross_attn.norm_k; pass it")
        return norm(self.to_k_ip(tokens)), self.to_v_ip(tokens)


class RefAdapterLayer(nn.Module):
    """Ref-adapter projections for one block's self-attention (full only)."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.to_k_ref = nn.Linear(dim, dim, bias=True, device=device, dtype=dtype)
        self.to_v_ref = nn.Linear(dim, dim, bias=True, device=device, dtype=dtype)

    def key_value(self, features: Tensor, block_norm_k: NormFn) -> tuple[Tensor, Tensor]:
        """``features``: the block's captured normalized self-attention input ``[B, L, dim]``."""
        if features.dim() != 3 or features.shape[-1] != self.dim:
            raise ValueError(f"reference features must be [B, L, {self.dim}], got {list(features.shape)}")
        features = features.to(dtype=self.to_k_ref.weight.dtype)
        return block_norm_k(self.to_k_ref(features)), self.to_v_ref(features)
