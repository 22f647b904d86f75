"""Sampling controls in a real ComfyUI (CPU, tiny random models; skipped without COMFYUI_PATH).

* empty block subsets and schedules equal to the constants give today's latents bit for bit;
  subsets of no block equal plain Wan (adapters at scale 0) bit for bit; a real schedule changes them;
* LynxGuider learns the step count from SamplerCustomAdvanced's sigmas and checks lists then;
* reference_loras: a tiny LoRA applied with LoraLoaderModelOnly changes the reference features only
  with reference_loras on; off, they equal those of the model without the LoRA.

Each graph holds several samplers over shared loaders (one prompt), each saving its latent with
SaveLatent, so the comparisons are on the exact float32 latents ComfyUI produced.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

W, H, FRAMES, STEPS = 64, 48, 5, 2
LORA_NAME = "lynx_e2e_tiny_lora.safetensors"


def _graph(server, adapters: str) -> dict:
    m = server.models
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": m["diffusion_model"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "3": server.clip_loader_node(),
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a woman smiling on the beach", "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "worst quality, blurred background",
                                                         "clip": ["3", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": m["face_image"]}},
        "7": {"class_type": "LoadLynxAdapters", "inputs": {"adapters": adapters, "dtype": "auto"}},
        "8": {"class_type": "LynxEncodeFaceID", "inputs": {
            "image": ["6", 0], "detector": "mtcnn", "face_select": "largest", "face_index": 0,
            "arcface_backend": "torch", "on_no_face": "error"}},
        "10": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": W, "height": H, "length": FRAMES,
                                                                   "batch_size": 1}},
    }


def _reference(model=("1", 0), **over) -> dict:
    inputs = {"model": list(model), "vae": ["2", 0], "clip": ["3", 0], "face": ["8", 0], "adapters": ["7", 0],
              "seed": 42}
    inputs.update(over)
    return {"class_type": "LynxEncodeReference", "inputs": inputs}


def _sampler(reference=("9", 0), model=("1", 0), **over) -> dict:
    inputs = {"model": list(model), "adapters": ["7", 0], "face": ["8", 0], "positive": ["4", 0],
              "negative": ["5", 0], "latent_image": ["10", 0], "seed": 42, "steps": STEPS, "cfg": 5.0, "cfg_id": 2.0,
              "ip_scale": 1.0, "ref_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0,
              "sampler_name": "euler", "scheduler": "lynx_official", "shift": 3.0, "blocks_to_swap": 0,
              "reference": list(reference)}
    inputs.update(over)
    return {"class_type": "LynxSampler", "inputs": inputs}


def _run_and_load(server, graph: dict, samplers: dict[str, dict], tag: str) -> dict[str, torch.Tensor]:
    """Add the samplers (name -> node) with a SaveLatent each, run the prompt, return the latents."""
    g = dict(graph)
    for n, (name, node) in enumerate(samplers.items()):
        sid, save = f"{100 + n}", f"{200 + n}"
        g[sid] = node
        g[save] = {"class_type": "SaveLatent", "inputs": {"samples": [sid, 0],
                                                          "filename_prefix": f"latents/{tag}_{name}"}}
    entry = server.run(g, timeout=900)
    out = {}
    for n, name in enumerate(samplers):
        (saved,) = entry["outputs"][f"{200 + n}"]["latents"]
        path = server.output_dir / saved["subfolder"] / saved["filename"]
        out[name] = load_file(str(path))["latent_tensor"]
    return out


def test_controls_at_their_defaults_and_extremes(comfy_server):
    g = _graph(comfy_server, comfy_server.models["lynx_adapters"])
    g["9"] = _reference()
    lat = _run_and_load(comfy_server, g, {
        "today": _sampler(),
        "empty": _sampler(ip_blocks="", ref_blocks="", cfg_schedule="", cfg_id_schedule="", ip_scale_schedule="",
                          ref_scale_schedule=""),
        "constants": _sampler(ip_blocks="0-1", ref_blocks="0, 1", cfg_schedule="5, 5", cfg_id_schedule="0:2",
                              ip_scale_schedule="1, 1", ref_scale_schedule="0:1, 0.5:1"),
        "no_blocks": _sampler(ip_blocks="none", ref_blocks="none"),
        "plain": _sampler(ip_scale=0.0, ref_scale=0.0),
        "cfg_id_steps": _sampler(cfg_id_schedule="2, 1"),
        "ip_block_1": _sampler(ip_blocks="1"),
    }, "controls")
    assert lat["today"].shape == (1, 16, 2, H // 8, W // 8)
    assert torch.equal(lat["today"], lat["empty"])
    assert torch.equal(lat["today"], lat["constants"])
    assert torch.equal(lat["no_blocks"], lat["plain"])
    assert not torch.equal(lat["today"], lat["plain"])
    assert not torch.equal(lat["today"], lat["cfg_id_steps"])
    assert not torch.equal(lat["today"], lat["ip_block_1"]) and not torch.equal(lat["plain"], lat["ip_block_1"])


def _write_tiny_lora(server) -> None:
    """A rank-4 LoRA on the self-attention and FFN of both blocks of the tiny DiT (ComfyUI's generic
    ``<module>.lora_up/lora_down.weight`` format), strong enough to move every later block's input."""
    folder = server.models_dir / "loras"
    folder.mkdir(exist_ok=True)
    path = folder / LORA_NAME
    if path.exists():
        return
    g = torch.Generator().manual_seed(11)
    dim, ffn, rank = 256, 512, 4
    sd = {}
    for b in range(2):
        for name, (out_f, in_f) in {"self_attn.q": (dim, dim), "self_attn.k": (dim, dim), "self_attn.v": (dim, dim),
                                    "self_attn.o": (dim, dim), "ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}.items():
            key = f"diffusion_model.blocks.{b}.{name}"
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
    save_file(sd, str(path))


def test_reference_loras(comfy_server):
    _write_tiny_lora(comfy_server)
    g = _graph(comfy_server, comfy_server.models["lynx_adapters"])
    g["30"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA_NAME,
                                                               "strength_model": 1.0}}
    # Node 9 is the previous test's reference (the model without the LoRA): ComfyUI reuses it from
    # the last prompt's outputs when this test follows that one.
    g["9"] = _reference(model=("1", 0))
    g["32"] = _reference(model=("30", 0))                                 # default: reference_loras off
    g["33"] = _reference(model=("30", 0), reference_loras=True)
    lora = ("30", 0)
    lat = _run_and_load(comfy_server, g, {
        "base_ref": _sampler(reference=("9", 0), model=lora),
        "off": _sampler(reference=("32", 0), model=lora),
        "on": _sampler(reference=("33", 0), model=lora),
        "no_lora": _sampler(reference=("9", 0), model=("1", 0)),
    }, "reference_loras")
    assert torch.equal(lat["off"], lat["base_ref"])
    assert not torch.equal(lat["on"], lat["base_ref"])
    # the sampler itself still runs with the LoRA (the reference pass left the MODEL as it was)
    assert not torch.equal(lat["no_lora"], lat["base_ref"])


def test_guider_checks_a_list_against_the_sigmas_it_gets(comfy_server):
    g = _graph(comfy_server, comfy_server.models["lynx_adapters_lite"])
    guider = _sampler(cfg_id=1.0, cfg_schedule="5, 4")
    for key in ("latent_image", "seed", "steps", "sampler_name", "scheduler", "shift", "reference"):
        guider["inputs"].pop(key)
    guider["class_type"] = "LynxGuider"
    g["11"] = guider
    g["20"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    g["21"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["22"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 3,
                                                          "denoise": 1.0}}
    g["23"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["20", 0], "guider": ["11", 0], "sampler": ["21", 0], "sigmas": ["22", 0], "latent_image": ["10", 0]}}
    g["24"] = {"class_type": "SaveLatent", "inputs": {"samples": ["23", 0], "filename_prefix": "latents/guider"}}
    with pytest.raises(AssertionError, match=r"cfg_schedule: 2 values for 3 steps"):
        comfy_server.run(g, timeout=600)
    g["22"]["inputs"]["steps"] = 2  # two sigmas steps: the same list fits
    entry = comfy_server.run(g, timeout=600)
    assert entry["outputs"]["24"]["latents"]
