"""A tiny random Wan model with Lynx-full adapters and everything a standalone generation needs
(shared by the pipeline, controls and batched-pass tests)."""
from dataclasses import dataclass

import torch

from lynx_core.adapters import LynxAdapters
from lynx_core.reference import extract_reference_features
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel

CFG = WAN_CONFIGS["tiny"]
SHAPE = (1, 16, 2, 4, 6)


def small_resampler(depth: int = 2) -> dict:
    return dict(id_dim=CFG.dim, resampler_dim=32, resampler_heads=2, resampler_dim_head=16, resampler_depth=depth)


def perturb(module, seed: int, std: float = 0.2) -> None:
    """Random weights far from the init's zeros (zero-initialised adapter outputs would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@dataclass
class TinyLynx:
    model: WanModel
    adapters: LynxAdapters
    prompt: torch.Tensor
    negative: torch.Tensor
    emb: torch.Tensor
    ref_cond: dict
    ref_uncond: dict


def tiny_lynx(resampler_depth: int = 2) -> TinyLynx:
    torch.manual_seed(0)
    model = WanModel(CFG).eval().requires_grad_(False)
    perturb(model, 1)
    full = LynxAdapters.create("full", dim=CFG.dim, num_blocks=CFG.num_layers, n_registers=4,
                               **small_resampler(resampler_depth)).eval()
    perturb(full, 2)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 6, CFG.text_dim, generator=g)
    negative = torch.randn(1, 6, CFG.text_dim, generator=g)
    ref_ctx = torch.randn(1, 4, CFG.text_dim, generator=g)
    face_latent = torch.randn(1, 16, 1, 8, 8, generator=g)
    emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    ref_c = extract_reference_features(model, face_latent, ref_ctx)
    ref_u = extract_reference_features(model, torch.zeros_like(face_latent), ref_ctx)
    return TinyLynx(model, full, prompt, negative, emb, ref_c, ref_u)
