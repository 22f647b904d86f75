"""Load/save Wan DiT weights: original (Wan / ComfyUI) names <-> diffusers names, config inference."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import WanConfig
from .model import WanModel

log = logging.getLogger(__name__)

# One table, both directions: {n} is a block index, {p} a projection letter (q/k/v). Names are
# matched on the key up to its .weight/.bias suffix (or the whole key for bare parameters).
_NAME_PAIRS = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.self_attn.{p}.", "blocks.{n}.attn1.to_{p}."),
    ("blocks.{n}.self_attn.o.", "blocks.{n}.attn1.to_out.0."),
    ("blocks.{n}.self_attn.norm_{p}.", "blocks.{n}.attn1.norm_{p}."),
    ("blocks.{n}.cross_attn.{p}.", "blocks.{n}.attn2.to_{p}."),
    ("blocks.{n}.cross_attn.o.", "blocks.{n}.attn2.to_out.0."),
    ("blocks.{n}.cross_attn.norm_{p}.", "blocks.{n}.attn2.norm_{p}."),
    ("blocks.{n}.norm3.", "blocks.{n}.norm2."),
    ("blocks.{n}.ffn.0.", "blocks.{n}.ffn.net.0.proj."),
    ("blocks.{n}.ffn.2.", "blocks.{n}.ffn.net.2."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
]
_GROUPS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>[qkv])"}


def _compile(src: str, dst: str):
    pattern = re.escape(src).replace(r"\{n\}", _GROUPS["n"]).replace(r"\{p\}", _GROUPS["p"])
    pattern = "^" + pattern + ("" if src.endswith(".") else "$")
    return re.compile(pattern), dst


_ORIG_TO_DIFF = [_compile(o, d) for o, d in _NAME_PAIRS]
_DIFF_TO_ORIG = [_compile(d, o) for o, d in _NAME_PAIRS]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def _rename(key: str, table) -> str:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict()) + key[m.end():]
    return key


def original_to_diffusers(state: dict) -> dict:
    return {_rename(k, _ORIG_TO_DIFF): v for k, v in state.items()}


def diffusers_to_original(state: dict) -> dict:
    return {_rename(k, _DIFF_TO_ORIG): v for k, v in state.items()}


def is_diffusers_naming(keys) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def normalize_state_dict(state: dict) -> dict:
    """Strip ComfyUI checkpoint prefixes and convert diffusers names to the original Wan names."""
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return diffusers_to_original(out) if is_diffusers_naming(out) else out


def infer_config(state: dict, num_heads: int | None = None) -> WanConfig:
    """Read the architecture off the tensor shapes (head_dim 128 unless stated, as all Wan2.1 sizes)."""
    try:
        pe = state["patch_embedding.weight"]
        dim = pe.shape[0]
        ffn = state["blocks.0.ffn.0.weight"].shape[0]
        text_dim = state["text_embedding.0.weight"].shape[1]
        freq_dim = state["time_embedding.0.weight"].shape[1]
        out_dim = state["head.head.weight"].shape[0] // (pe.shape[2] * pe.shape[3] * pe.shape[4])
    except KeyError as err:
        raise ValueError(f"not a Wan2.1 DiT state dict: missing key {err}. Expected original "
                         "(patch_embedding, blocks.N.self_attn...) or diffusers names") from None
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = num_heads or (dim // 128 if dim % 128 == 0 else None)
    if heads is None:
        raise ValueError(f"cannot infer the head count of a {dim}-wide model; pass num_heads")
    return WanConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, in_dim=pe.shape[1],
                     out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim,
                     patch_size=tuple(pe.shape[2:]),
                     cross_attn_norm="blocks.0.norm3.weight" in state)


def load_wan(path: str | Path, dtype: torch.dtype | None = None, device="cpu") -> WanModel:
    """Build a WanModel from a .safetensors file in original, ComfyUI or diffusers naming."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors Wan checkpoints are accepted (pickle files can "
                         "run code when loaded); convert it, or pick the .safetensors release")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    state = normalize_state_dict(load_file(str(path), device=str(device)))
    cfg = WanConfig.from_json(meta["lynx_config"]) if "lynx_config" in meta else infer_config(state)
    with torch.device("meta"):
        model = WanModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{path}: does not match a Wan2.1 T2V DiT of {cfg.dim} width: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model.to(dtype)
    return model.eval().requires_grad_(False)


def save_wan(model: WanModel, path: str | Path, diffusers_names: bool = False, prefix: str = "") -> Path:
    """Save weights (original names by default; ``prefix='model.diffusion_model.'`` for ComfyUI)."""
    path = Path(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if diffusers_names:
        state = original_to_diffusers(state)
    state = {prefix + k: v for k, v in state.items()}
    save_file(state, str(path), metadata={"lynx_config": model.config.to_json()})
    return path
