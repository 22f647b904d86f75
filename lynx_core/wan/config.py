"""Wan2.1 DiT hyper-parameters (the shapes the original checkpoints imply)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
import json


@dataclass(frozen=True)
class WanConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: int = 512
    cross_attn_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WanConfig":
        data = json.loads(text)
        data["patch_size"] = tuple(data["patch_size"])
        return cls(**data)

    def with_(self, **changes) -> "WanConfig":
        return replace(self, **changes)


WAN_CONFIGS: dict[str, WanConfig] = {
    # Small enough for CPU tests and the demo; head_dim 16 keeps the 3-axis RoPE split meaningful.
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32),
    "1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def describe_size(dim: int, num_layers: int) -> str:
    """Human name of a Wan width/depth, for error messages."""
    for name, cfg in WAN_CONFIGS.items():
        if cfg.dim == dim and cfg.num_layers == num_layers and name != "tiny":
            return f"Wan {name}"
    if dim == 5120 and num_layers == 40:
        return "Wan 14B"
    return f"a {dim}-wide, {num_layers}-block Wan"
