"""Build the tiny random models the ComfyUI end-to-end tests run on.

Run with the Python that runs ComfyUI, with ComfyUI's folder and this repository on ``sys.path``
(the e2e fixture does that): ``python tiny_models.py MODELS_DIR INPUT_DIR`` prints a JSON dict of
the file names it wrote. Nothing here is downloaded: every weight is drawn from a seeded generator.

* diffusion model: a 2-block Wan2.1 T2V DiT, width 256 (2 heads of 128, the head size ComfyUI's
  detection assumes), text width 4096, saved in ComfyUI's file layout
  (``model.diffusion_model.`` + original Wan names) so the stock UNETLoader detects it.
* VAE: the real Wan2.1 VAE architecture (ComfyUI picks its config from key names, so it cannot be
  shrunk) with random weights.
* text encoder: a UMT5 with the real width (4096, what the Wan DiT's text embedding takes) and the
  24 blocks that ComfyUI's detection looks for, but 2 heads and a 32-wide FFN, plus a freshly
  trained 300-piece SentencePiece tokenizer stored under ``spiece_model`` as in ComfyUI's own
  UMT5 files. ComfyUI reads UMT5's sizes from a fixed JSON, so the e2e support pack loads this
  file through ``comfy.sd.load_clip`` with the small sizes (kept in the file's metadata).
* Lynx adapters: full (official folder layout) and lite (one combined file) for that DiT.
* ArcFace: a random IR-SE50 (the real architecture, in models/facexlib), and the
  public-domain astronaut portrait from scikit-image as the face photo.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import torch

DIT_NAME = "lynx_tiny_wan_t2v.safetensors"
VAE_NAME = "lynx_tiny_wan_vae.safetensors"
TE_NAME = "lynx_tiny_umt5.safetensors"
FULL_NAME = "lynx_tiny_full"
LITE_NAME = "lynx_tiny_lite.safetensors"
ARCFACE_NAME = "recognition_arcface_ir_se50.pth"
FACE_NAME = "lynx_e2e_face.png"

DIT_DIM = 256
DIT_BLOCKS = 2
TINY_UMT5 = {"num_layers": 24, "num_heads": 2, "d_kv": 16, "d_ff": 32, "vocab_size": 300}


def _init_(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter from a seeded generator with fan-in scaled values (ComfyUI's ops skip
    the usual init, so parameters start as uninitialised memory)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma",) or (p.ndim == 1 and "norm" in name and leaf == "weight"):
                p.copy_(torch.ones_like(p))
            elif leaf == "bias" or leaf == "beta":
                p.copy_(torch.zeros_like(p))
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def build_dit(path: Path) -> None:
    from lynx_core.wan.checkpoint import save_wan
    from lynx_core.wan.config import WanConfig
    from lynx_core.wan.model import WanModel

    torch.manual_seed(0)
    model = WanModel(WanConfig(dim=DIT_DIM, ffn_dim=512, num_heads=DIT_DIM // 128, num_layers=DIT_BLOCKS))
    save_wan(model, path, prefix="model.diffusion_model.")


def _comfy_on_cpu() -> None:
    """ComfyUI's device probe runs at import; a CUDA build of torch without a GPU must be told."""
    from comfy.cli_args import args

    args.cpu = True


def build_vae(path: Path) -> None:
    from safetensors.torch import save_file
    _comfy_on_cpu()
    from comfy.ldm.wan.vae import WanVAE

    vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    _init_(vae, 1)
    save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(path))


def _spiece_model() -> bytes:
    import sentencepiece as spm

    words = ("a woman an astronaut face image of smiling portrait walking on the beach at sunset "
             "bright tones overexposed blurred background static worst quality low man").split()
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=out, vocab_size=TINY_UMT5["vocab_size"],
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
        hard_vocab_limit=False)
    return out.getvalue()


def build_text_encoder(path: Path) -> None:
    _comfy_on_cpu()
    import comfy.ops
    from comfy.text_encoders.t5 import T5
    from safetensors.torch import save_file

    config = json.loads((Path(sys.modules["comfy.text_encoders.t5"].__file__).parent / "umt5_config_xxl.json").read_text())
    config.update(TINY_UMT5)
    t5 = T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    _init_(t5, 2)
    state = {k: v.to(torch.float16).contiguous() for k, v in t5.state_dict().items()}
    state["spiece_model"] = torch.frombuffer(bytearray(_spiece_model()), dtype=torch.uint8)
    save_file(state, str(path), metadata={"lynx_e2e_umt5_config": json.dumps(TINY_UMT5)})


def build_adapters(lynx_dir: Path) -> None:
    from lynx_core.adapters import LynxAdapters, save_adapters, save_adapters_combined

    torch.manual_seed(3)
    kw = dict(dim=DIT_DIM, num_blocks=DIT_BLOCKS, resampler_dim=128, resampler_heads=2,
              resampler_dim_head=64, resampler_depth=1)
    save_adapters(LynxAdapters.create("full", **kw), lynx_dir / FULL_NAME, overwrite=True)
    save_adapters_combined(LynxAdapters.create("lite", id_dim=128, **kw), lynx_dir / LITE_NAME, overwrite=True)


def build_arcface(path: Path) -> None:
    """A random IR-SE50 (the real architecture, so the default torch ArcFace backend runs)."""
    from lynx_core.face.arcface import IRSE50

    torch.manual_seed(4)
    torch.save(IRSE50().eval().state_dict(), str(path))


def build_all(models_dir: Path, input_dir: Path) -> dict[str, str]:
    dirs = {name: models_dir / name for name in ("diffusion_models", "vae", "text_encoders", "lynx", "facexlib")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    input_dir.mkdir(parents=True, exist_ok=True)
    build_dit(dirs["diffusion_models"] / DIT_NAME)
    build_vae(dirs["vae"] / VAE_NAME)
    build_text_encoder(dirs["text_encoders"] / TE_NAME)
    build_adapters(dirs["lynx"])
    build_arcface(dirs["facexlib"] / ARCFACE_NAME)
    import skimage.data

    shutil.copyfile(Path(skimage.data.__file__).parent / "astronaut.png", input_dir / FACE_NAME)
    return {
        "diffusion_model": DIT_NAME,
        "vae": VAE_NAME,
        "text_encoder": TE_NAME,
        "lynx_adapters": FULL_NAME,
        "lynx_adapters_lite": LITE_NAME,
        "arcface": ARCFACE_NAME,
        "face_image": FACE_NAME,
    }


if __name__ == "__main__":
    print(json.dumps(build_all(Path(sys.argv[1]), Path(sys.argv[2]))))
