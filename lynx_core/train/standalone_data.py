"""The dataset cache for command-line training: diffusers' Wan VAE and UMT5 and our face pipeline.

Inside ComfyUI the graph hands in its own VAE and CLIP instead; both end in the same cache format.
Only the first process of a distributed run builds the cache; the others wait and open it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .cache import CacheSettings, DataEncoders, TrainCache
from .config import TrainConfig
from .distributed import World, barrier
from .trainer import TrainingError

log = logging.getLogger(__name__)


def standalone_encoders(cfg: TrainConfig, device) -> DataEncoders:
    if cfg.vae == "tiny" or cfg.text_encoder == "tiny":
        from .tiny_encoders import TinyTextEncoder, TinyVAE
        vae, te = TinyVAE(), TinyTextEncoder()
        encode_video, encode_text = vae, te
        vae_id, te_id = vae.identifier, te.identifier
    else:
        if not cfg.vae or not cfg.text_encoder:
            raise TrainingError("building the dataset cache needs vae and text_encoder (the vae/ and text_encoder/ "
                                "folders of a Wan2.1-T2V-14B-Diffusers download), or an already built cache")
        from ..extras.diffusers_io import TextEncoder, WanVAE, encode_frames, encode_text_trimmed
        vae, te = WanVAE(cfg.vae, device=device), TextEncoder(cfg.text_encoder, device=device)
        encode_video = lambda frames: encode_frames(vae, frames)  # noqa: E731
        encode_text = lambda text: encode_text_trimmed(te, text)  # noqa: E731
        vae_id, te_id = f"diffusers:{Path(cfg.vae).resolve()}", f"diffusers:{Path(cfg.text_encoder).resolve()}"
    from ..face import FaceAnalyzer
    face = FaceAnalyzer(detector=cfg.detector, arcface_path=cfg.arcface or None)
    return DataEncoders(encode_video=encode_video, encode_text=encode_text, face=face,
                        vae_id=vae_id if isinstance(vae_id, str) else vae_id(),
                        text_encoder_id=te_id if isinstance(te_id, str) else te_id())


def build_or_open_cache(cfg: TrainConfig, device, world: World):
    """(TrainCache, fixed embeddings, fingerprints) for cfg.dataset, built once, reused while valid."""
    settings = CacheSettings.from_dict({"seed": cfg.seed, "heldout": cfg.heldout, **cfg.data})
    if world.is_main:
        cache = TrainCache.build(cfg.dataset, cfg.cache_dir, standalone_encoders(cfg, device), settings)
        for path, reason in cache.dropped:
            log.warning("dropped %s: %s", path, reason)
    barrier(world)
    if not world.is_main:
        cache = TrainCache.open(cfg.cache_dir)
    return cache, cache.fixed, {"dataset": cache.fingerprint}
