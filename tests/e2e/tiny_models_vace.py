"""A tiny random Wan VACE checkpoint (and Lynx adapters for it) that ComfyUI detects as VACE.

ComfyUI's ``model_detection`` reads a Wan2.1 DiT from ``head.modulation`` and calls it VACE when
``vace_patch_embedding.weight`` is present: ``vace_in_dim`` from that weight's input channels (96:
16 inactive + 16 reactive latent channels + 64 mask channels) and ``vace_layers`` from the count of
``vace_blocks.N.`` prefixes. Each VACE block is a Wan block plus ``after_proj`` (and ``before_proj``
on block 0). The hints go after main blocks ``range(0, num_layers, num_layers // vace_layers)``.

One main block on purpose: with a single block and one Euler step, the reference frame's output
depends only on its own tokens' Lynx branches (self-attention reads the block *input* of the other
tokens), so the VACE e2e test can see exactly whether the Ref-adapter touched it.

``python tiny_models_vace.py MODELS_DIR`` writes the files and prints their names as JSON; the
VACE e2e test calls :func:`build_vace_models` itself. Nothing is downloaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

VACE_DIT_NAME = "lynx_tiny_wan_vace.safetensors"
VACE_ADAPTERS_NAME = "lynx_tiny_vace_full"
DIM, BLOCKS, VACE_BLOCKS, VACE_IN = 256, 1, 1, 96
PREFIX = "model.diffusion_model."


def vace_state(seed: int = 10) -> dict[str, torch.Tensor]:
    """The whole VACE state dict in ComfyUI's layout (main Wan DiT + VACE blocks), float32."""
    from lynx_core.wan.config import WanConfig
    from lynx_core.wan.model import WanModel

    torch.manual_seed(seed)
    model = WanModel(WanConfig(dim=DIM, ffn_dim=512, num_heads=DIM // 128, num_layers=BLOCKS))
    state = {PREFIX + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)

    def rand(shape, fan_in):
        return (torch.randn(shape, generator=g) / fan_in ** 0.5).contiguous()

    block0 = {k[len(PREFIX + "blocks.0."):]: v for k, v in state.items() if k.startswith(PREFIX + "blocks.0.")}
    for i in range(VACE_BLOCKS):
        for name, v in block0.items():
            fresh = rand(v.shape, v[0].numel() if v.ndim > 1 else v.numel()) if v.ndim > 1 else v.clone()
            state[f"{PREFIX}vace_blocks.{i}.{name}"] = fresh
        projections = ["after_proj"] + (["before_proj"] if i == 0 else [])
        for proj in projections:
            state[f"{PREFIX}vace_blocks.{i}.{proj}.weight"] = rand((DIM, DIM), DIM)
            state[f"{PREFIX}vace_blocks.{i}.{proj}.bias"] = torch.zeros(DIM)
    state[PREFIX + "vace_patch_embedding.weight"] = rand((DIM, VACE_IN, 1, 2, 2), VACE_IN * 4)
    state[PREFIX + "vace_patch_embedding.bias"] = torch.zeros(DIM)
    return state


def build_vace_models(models_dir: Path) -> dict[str, str]:
    """Write the VACE DiT (models/diffusion_models) and full adapters for it (models/lynx)."""
    from safetensors.torch import save_file

    from lynx_core.adapters import LynxAdapters, save_adapters

    dit = models_dir / "diffusion_models" / VACE_DIT_NAME
    dit.parent.mkdir(parents=True, exist_ok=True)
    save_file(vace_state(), str(dit))
    torch.manual_seed(13)
    adapters = LynxAdapters.create("full", dim=DIM, num_blocks=BLOCKS, resampler_dim=128, resampler_heads=2,
                                   resampler_dim_head=64, resampler_depth=1)
    save_adapters(adapters, models_dir / "lynx" / VACE_ADAPTERS_NAME, overwrite=True)
    return {"vace_model": VACE_DIT_NAME, "vace_adapters": VACE_ADAPTERS_NAME}


if __name__ == "__main__":
    print(json.dumps(build_vace_models(Path(sys.argv[1]))))
