"""A built-in synthetic identity task and tiny random models: training you can watch on a CPU.

K identities, each a random unit 'ArcFace' embedding and a random reference latent, each tied to
its own target pattern (a colour per identity over a shared texture). Every identity has several targets (its pattern plus a little variation)
with the same caption, so only the identity tells the patterns apart: a trained ID/Ref-adapter
lowers the loss with the right identity and not with a shuffled one.
"""
from __future__ import annotations

import torch

from ..adapters import LynxAdapters
from ..wan.config import WAN_CONFIGS
from ..wan.model import WanModel
from .types import FixedEmbeddings, TrainSample


def tiny_models(seed: int = 0, variant: str = "full") -> tuple[WanModel, LynxAdapters]:
    """The tiny random Wan DiT (frozen, eval) and freshly initialised tiny adapters of its shape."""
    cfg = WAN_CONFIGS["tiny"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanModel(cfg).eval().requires_grad_(False)
        adapters = LynxAdapters.create(variant, dim=cfg.dim, num_blocks=cfg.num_layers, resampler_dim=64,
                                       resampler_heads=4, resampler_dim_head=16, resampler_depth=2)
    return model, adapters


def synthetic_identities(k: int = 4, per_identity: int = 4, *, text_dim: int = 32, grid=(1, 8, 8),
                         ref_size: int = 8, variation: float = 0.1, seed: int = 0
                         ) -> tuple[list[TrainSample], set[int], FixedEmbeddings]:
    """Samples of K identities (the last of each identity held out) and the fixed embeddings."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(6, text_dim, generator=g)
    texture = 0.3 * torch.randn(16, *grid, generator=g)
    samples: list[TrainSample] = []
    heldout: set[int] = set()
    for ident in range(k):
        emb = torch.randn(512, generator=g)
        emb = emb / emb.norm()
        ref = torch.randn(16, 1, ref_size, ref_size, generator=g)
        # A per-channel colour for the whole frame: what attention to a few identity tokens can
        # express everywhere at once (it carries no position), on top of a shared texture.
        pattern = 1.5 * torch.randn(16, 1, 1, 1, generator=g) + texture
        for j in range(per_identity):
            latent = pattern + variation * torch.randn(16, *grid, generator=g)
            if j == per_identity - 1:
                heldout.add(len(samples))
            samples.append(TrainSample(latent=latent, text=text.clone(), face_embedding=emb.clone(),
                                       ref_latent=ref.clone(), key=f"identity{ident}/target{j}"))
    fixed = FixedEmbeddings(reference_text=torch.randn(4, text_dim, generator=g),
                            empty_text=torch.zeros(1, text_dim),
                            negative_text=torch.randn(6, text_dim, generator=g),
                            grey_ref_latent=torch.zeros(16, 1, ref_size, ref_size))
    return samples, heldout, fixed


def shuffled_identities(samples: list[TrainSample], indices: list[int]) -> list[int]:
    """For each index, a sample of *another* identity (the next identity's, cyclically)."""
    idents = sorted({s.key.split("/")[0] for s in samples})
    by_ident = {name: [i for i, s in enumerate(samples) if s.key.startswith(name + "/")] for name in idents}
    out = []
    for i in indices:
        name = samples[i].key.split("/")[0]
        other = idents[(idents.index(name) + 1) % len(idents)]
        out.append(by_ident[other][0])
    return out
