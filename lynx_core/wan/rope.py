"""3-axis rotary embedding of Wan2.1, in float64 as the reference implementation computes it."""
from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims given to (time, height, width): 44:42:42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_table(max_pos: int, dim: int, theta: float) -> torch.Tensor:
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(angles), angles)  # complex128 [max_pos, dim/2]


def rope_freqs(grid: tuple[int, int, int], head_dim: int, device=None, theta: float = 10000.0,
               max_pos: int = 1024) -> torch.Tensor:
    """Complex128 table [F*H*W, head_dim/2] for tokens ordered f-major, then h, then w."""
    f, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    tf, th, tw = (_axis_table(max_pos, d, theta) for d in (dt, dh, dw))
    table = torch.cat([
        tf[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        tw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1)
    return table.reshape(f * h * w, -1).to(device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive (even, odd) pairs of x [B, L, H, D] by freqs [L, D/2]; float64 math."""
    b, s, n, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, s, n, d // 2, 2))
    out = torch.view_as_real(xc * freqs[:s].view(1, s, 1, d // 2)).flatten(3)
    return out.to(x.dtype)
