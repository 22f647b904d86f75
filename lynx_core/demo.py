"""`python -m lynx_core demo`: the whole Lynx chain end to end.

Face photo -> landmarks -> aligned crops -> ArcFace embedding -> ID tokens; reference pass at t=0;
three-pass guided sampling; decode; video file. With no arguments it runs a tiny random model on
the CPU in seconds, which makes coloured noise, not a person: it proves the chain, not the weights.
With --wan/--adapters/--arcface (+ --vae/--text-encoder from a Wan2.1-T2V-14B-Diffusers download)
it runs the real models.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .adapters import LynxAdapters, load_adapters
from .latent_preview import latent_to_rgb, rgb_to_latent
from .lynx import LynxPatch, make_conditioning
from .pipeline import GenerationSettings, generate, latent_shape
from .reference import REFERENCE_PROMPT, extract_reference_features
from .video import next_free_path, write_video
from .wan.checkpoint import load_wan
from .wan.config import WAN_CONFIGS
from .wan.model import WanModel

log = logging.getLogger("lynx_core.demo")

DEFAULT_PROMPT = "A person smiles and turns towards the camera in warm evening light, cinematic"
DEFAULT_NEGATIVE = ("Bright tones, overexposed, blurred background, static, subtitles, style, works, paintings, "
                    "images, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
                    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
                    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
                    "in the background, walking backwards")


def build_parser(sub=None) -> argparse.ArgumentParser:
    p = sub or argparse.ArgumentParser(prog="python -m lynx_core demo", description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--face", type=Path, help="face photo (default: the shipped example photo, lynx_core/assets/)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative", default=DEFAULT_NEGATIVE)
    p.add_argument("--wan", type=Path, help="Wan2.1-T2V DiT .safetensors (original, ComfyUI or diffusers names)")
    p.add_argument("--adapters", type=Path, help="Lynx adapters: lynx_full/ or lynx_lite/ folder, or a combined file")
    p.add_argument("--arcface", type=Path, help="recognition_arcface_ir_se50.pth (default: random weights for the tiny demo)")
    p.add_argument("--vae", type=Path, help="diffusers Wan VAE folder (needs diffusers)")
    p.add_argument("--text-encoder", type=Path, help="diffusers-layout UMT5 text_encoder folder (needs transformers)")
    p.add_argument("--detector", default="mtcnn", help="mtcnn | auto | insightface:buffalo_l | insightface:antelopev2")
    p.add_argument("--frames", type=int, default=None, help="4k+1 (tiny default 17; real: 81 full, 121 lite)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="tiny default 8, real default 50")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--cfg-id", type=float, default=None,
                   help="identity guidance (default: 2.0 three-pass for full adapters, 0 two-pass for lite)")
    p.add_argument("--ip-scale", type=float, default=1.0)
    p.add_argument("--ref-scale", type=float, default=1.0)
    p.add_argument("--sampler", default="unipc", choices=["unipc", "euler"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fps", type=float, default=None, help="default: 16 (full), 24 (lite)")
    p.add_argument("--format", default="mp4", choices=["mp4", "webm", "webp", "gif"])
    p.add_argument("--out", type=Path, default=Path("output"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    return p


def _pseudo_text(prompt: str, dim: int, tokens: int = 16) -> torch.Tensor:
    """Tiny-demo stand-in for UMT5: a fixed random embedding per prompt (same prompt, same tensor)."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed))


def _tiny_models(device, dtype):
    cfg = WAN_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = WanModel(cfg)
    adapters = LynxAdapters.create("full", dim=cfg.dim, num_blocks=cfg.num_layers, resampler_dim=64,
                                   resampler_heads=4, resampler_dim_head=16, resampler_depth=2)
    return model.to(device, dtype).eval().requires_grad_(False), adapters.to(device, dtype).eval()


def _random_arcface(folder: Path) -> Path:
    from .face.arcface import IRSE50
    torch.manual_seed(0)
    path = folder / "arcface_random.pth"
    torch.save(IRSE50().state_dict(), path)
    return path


def run(args) -> Path:
    t0 = time.time()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if (args.wan and device.type == "cuda") else torch.float32)
    real = args.wan is not None
    if real and args.adapters is None:
        raise SystemExit("--wan needs --adapters (a lynx_full/ or lynx_lite/ folder, or a combined file)")
    if real and (args.vae is None or args.text_encoder is None):
        raise SystemExit("a real run needs --vae and --text-encoder (folders of a Wan2.1-T2V-14B-Diffusers download)")

    # models
    if real:
        model = load_wan(args.wan, dtype=dtype, device="cpu").to(device)
        adapters = load_adapters(args.adapters, dtype=dtype).to(device)
        adapters.check_fits(model.config.dim, model.config.num_layers, str(args.wan))
    else:
        model, adapters = _tiny_models(device, dtype)

    # the official defaults of the adapters' variant (lite: 121 frames at 24 fps, two-pass guidance)
    lite = adapters.variant == "lite"
    frames = args.frames or ((121 if lite else 81) if real else 17)
    fps = args.fps or (24.0 if lite else 16.0)
    height, width = args.height or (480 if real else 128), args.width or (832 if real else 192)
    steps = args.steps or (50 if real else 8)
    shape = latent_shape(frames, height, width)

    # face
    from .face import FaceAnalyzer
    if args.face is not None:
        from PIL import Image
        image = np.asarray(Image.open(args.face).convert("RGB"))
    else:
        from PIL import Image
        from .assets import EXAMPLE_FACE
        image = np.asarray(Image.open(EXAMPLE_FACE).convert("RGB"))
    with tempfile.TemporaryDirectory() as tmp:
        arcface = args.arcface or _random_arcface(Path(tmp))
        face = FaceAnalyzer(detector=args.detector, arcface_path=arcface).encode(image[None])
    print(face.summary())

    # text and reference latents
    if real:
        from .extras.diffusers_io import TextEncoder, WanVAE
        te = TextEncoder(args.text_encoder, device=device)
        prompt_ctx, negative_ctx = te.encode(args.prompt), te.encode(args.negative)
        ref_ctx = te.encode(REFERENCE_PROMPT, clean=False)
        del te
        vae = WanVAE(args.vae, device=device)
        ref_cond = vae.encode_reference(face.reference_crop, args.seed)
        ref_uncond = vae.encode_reference(face.reference_crop, args.seed, grey=True)
    else:
        dim = model.config.text_dim
        prompt_ctx, negative_ctx, ref_ctx = (_pseudo_text(p, dim) for p in (args.prompt, args.negative, REFERENCE_PROMPT))
        ref_cond = rgb_to_latent(face.reference_crop)
        ref_uncond = rgb_to_latent(np.full_like(face.reference_crop, 127))
    to = dict(device=device, dtype=dtype)
    ref_c = extract_reference_features(model, ref_cond.to(**to), ref_ctx.to(**to)) if adapters.has_ref else None
    ref_u = extract_reference_features(model, ref_uncond.to(**to), ref_ctx.to(**to)) if adapters.has_ref else None

    embedding = face.embedding.to(**to) if face.has_identity else None
    patch = LynxPatch(adapters, make_conditioning(adapters, embedding, ref_c, ref_u))
    # cfg_id None follows the adapters' variant; the scales reach the patch through the settings
    settings = GenerationSettings(seed=args.seed, steps=steps, cfg=args.cfg, cfg_id=args.cfg_id,
                                  ip_scale=args.ip_scale, ref_scale=args.ref_scale, sampler=args.sampler)

    def progress(i, total, *_):
        print(f"\rstep {i + 1}/{total}", end="", flush=True)

    latents = generate(model, prompt_ctx.to(**to), negative_ctx.to(**to), shape, settings, patch, callback=progress)
    print()
    video = WanVAE(args.vae, device=device).decode(latents) if real else latent_to_rgb(latents)
    path = next_free_path(args.out, "lynx_demo", args.format)
    write_video(video, path, fps=fps, format=args.format,
                metadata={"comment": f"Lynx demo; prompt: {args.prompt}; seed {args.seed}; steps {steps}"})
    print(f"wrote {path}  ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, {time.time() - t0:.1f} s)")
    if not real:
        print("NOTE: this was a tiny model with RANDOM weights, so the video is coloured noise, not a person.\n"
              "It proves the whole chain runs. For real output pass --wan, --adapters, --arcface, --vae and\n"
              "--text-encoder, or use the ComfyUI nodes (see README).")
    return path


