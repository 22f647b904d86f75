"""Lynx on a VACE model in a real ComfyUI: WanVaceToVideo (with a reference image) -> LynxSampler ->
TrimVideoLatent -> VAE Decode, on a tiny random VACE checkpoint that ComfyUI's own detection loads
as ``VaceWanModel``. Skipped without COMFYUI_PATH.

The proof that the Ref-adapter skips the VACE reference frame: the tiny model has one main block
and the run takes one Euler step, so each token's output depends on its own Lynx branches only
(self-attention reads the other tokens' block *inputs*). Then the reference frame of a run with
``ref_scale`` 1 must equal, exactly, that of a run with ``ref_scale`` 0, while the video frames
differ (the Ref-adapter did act there). Both runs keep the ID-adapter on.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tiny_models_vace import build_vace_models

W, H, FRAMES = 64, 48, 5   # 5 frames -> 2 latent frames, plus 1 for the reference image


@pytest.fixture(scope="module")
def vace(comfy_server):
    """The tiny VACE checkpoint and its adapters, written into the running server's model folders."""
    return build_vace_models(comfy_server.models_dir)


def vace_graph(server, vace: dict, ref_scale: float, prefix: str) -> dict:
    m = server.models
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": vace["vace_model"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "3": server.clip_loader_node(),
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a woman smiling on the beach at sunset", "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "worst quality, blurred background", "clip": ["3", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": m["face_image"]}},
        "7": {"class_type": "LoadLynxAdapters", "inputs": {"adapters": vace["vace_adapters"], "dtype": "auto"}},
        "8": {"class_type": "LynxEncodeFaceID", "inputs": {
            "image": ["6", 0], "detector": "mtcnn", "face_select": "largest", "face_index": 0,
            "arcface_backend": "torch", "on_no_face": "error"}},
        "9": {"class_type": "LynxEncodeReference", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "clip": ["3", 0], "face": ["8", 0], "adapters": ["7", 0], "seed": 42}},
        "10": {"class_type": "WanVaceToVideo", "inputs": {
            "positive": ["4", 0], "negative": ["5", 0], "vae": ["2", 0], "width": W, "height": H, "length": FRAMES,
            "batch_size": 1, "strength": 1.0, "reference_image": ["6", 0]}},
        "11": {"class_type": "LynxSampler", "inputs": {
            "model": ["1", 0], "adapters": ["7", 0], "face": ["8", 0], "positive": ["10", 0], "negative": ["10", 1],
            "latent_image": ["10", 2], "seed": 42, "steps": 1, "cfg": 5.0, "cfg_id": 2.0, "ip_scale": 1.0,
            "ref_scale": ref_scale, "start_percent": 0.0, "end_percent": 1.0, "sampler_name": "euler",
            "scheduler": "lynx_official", "shift": 3.0, "blocks_to_swap": 0, "reference": ["9", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": prefix}},
        "13": {"class_type": "TrimVideoLatent", "inputs": {"samples": ["11", 0], "trim_amount": ["10", 3]}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["2", 0]}},
        "15": {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}},
    }


def saved_latent(server, entry: dict, node: str = "12") -> torch.Tensor:
    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def test_lynx_on_vace_skips_the_reference_frame_in_the_ref_branch(comfy_server, vace):
    with_ref = comfy_server.run(vace_graph(comfy_server, vace, 1.0, "vace_e2e/ref_on"), timeout=600)
    log = comfy_server.log_tail(200_000)
    without_ref = comfy_server.run(vace_graph(comfy_server, vace, 0.0, "vace_e2e/ref_off"), timeout=600)

    # ComfyUI's detection made a VACE model of the tiny file and WanVaceToVideo prepended 1 frame.
    a, b = saved_latent(comfy_server, with_ref), saved_latent(comfy_server, without_ref)
    assert a.shape == b.shape == (1, 16, 1 + (FRAMES - 1) // 4 + 1, H // 8, W // 8)
    assert "VACE reference image(s) in the first 1 latent frame(s); the Ref-adapter skips their tokens" in log
    # The reference frame: untouched by the Ref-adapter, to the bit. The video frames: changed by it.
    assert torch.isfinite(a).all()
    assert torch.equal(a[:, :, :1], b[:, :, :1])
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-3
    # TrimVideoLatent cut the reference frame off: VAE Decode gave the 5 video frames.
    assert len(with_ref["outputs"]["15"]["images"]) == FRAMES


def test_shipped_vace_template_runs_on_tiny_models(comfy_server, vace):
    """workflows/api/lynx_full_vace_api.json as shipped, pointed at the tiny models and made small."""
    import json
    from pathlib import Path

    from lynx_core.video import probe

    wf = json.loads((Path(__file__).resolve().parents[2] / "workflows" / "api" / "lynx_full_vace_api.json").read_text())
    m = comfy_server.models
    for node in wf.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inputs["unet_name"] = vace["vace_model"]
        elif ct == "VAELoader":
            inputs["vae_name"] = m["vae"]
        elif ct == "CLIPLoader":
            node.update(comfy_server.clip_loader_node())
        elif ct == "LoadLynxAdapters":
            inputs["adapters"] = vace["vace_adapters"]
        elif ct == "LoadImage":
            inputs["image"] = m["face_image"]
        elif ct == "LynxEncodeFaceID":
            inputs["detector"] = "mtcnn"
        elif ct == "WanVaceToVideo":
            inputs.update(width=W, height=H, length=FRAMES)
        elif ct == "LynxSampler":
            inputs["steps"] = 2
        elif ct == "LynxVideoCombine":
            inputs["filename_prefix"] = "vace_e2e/template"
    entry = comfy_server.run(wf, timeout=600)
    (combine,) = [k for k, n in wf.items() if n["class_type"] == "LynxVideoCombine"]
    (video,) = entry["outputs"][combine]["videos"]
    info = probe(comfy_server.output_dir / video["subfolder"] / video["filename"])
    assert (info["width"], info["height"], info["frames"]) == (W, H, FRAMES)  # the reference frame was trimmed off
