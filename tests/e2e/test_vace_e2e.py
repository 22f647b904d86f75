"""Lynx on a VACE model in a real ComfyUI: the shipped VACE template (WanVaceToVideo with a
reference image -> LynxSampler -> TrimVideoLatent -> VAE Decode -> Lynx Video Combine), made small
and run on a tiny random VACE checkpoint that ComfyUI's own detection loads as ``VaceWanModel``.
Skipped without COMFYUI_PATH.

The proof that the Ref-adapter skips the VACE reference frame: the tiny model has one main block
and the run takes one Euler step, so each token's output depends on its own Lynx branches only
(self-attention reads the other tokens' block *inputs*). Then the reference frame of a run with
``ref_scale`` 1 must equal, exactly, that of a run with ``ref_scale`` 0, while the video frames
differ (the Ref-adapter did act there). Both runs keep the ID-adapter on.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lynx_core.video import probe
from tiny_models_vace import build_vace_models

TEMPLATE = Path(__file__).resolve().parents[2] / "workflows" / "api" / "lynx_full_vace_api.json"
W, H, FRAMES = 64, 48, 5   # 5 frames -> 2 latent frames, plus 1 for the reference image


@pytest.fixture(scope="module")
def vace(comfy_server):
    """The tiny VACE checkpoint and its adapters, written into the running server's model folders."""
    return build_vace_models(comfy_server.models_dir)


def node_id(wf: dict, class_type: str) -> str:
    (nid,) = [k for k, n in wf.items() if n["class_type"] == class_type]
    return nid


def tiny_template(server, vace: dict, ref_scale: float, prefix: str) -> dict:
    """The shipped template on the tiny models (64x48, 5 frames, 1 Euler step), the sampler's
    untrimmed latent saved beside the video."""
    wf = json.loads(TEMPLATE.read_text())
    m = server.models
    for node in wf.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inputs["unet_name"] = vace["vace_model"]
        elif ct == "VAELoader":
            inputs["vae_name"] = m["vae"]
        elif ct == "CLIPLoader":
            node.update(server.clip_loader_node())
        elif ct == "LoadLynxAdapters":
            inputs["adapters"] = vace["vace_adapters"]
        elif ct == "LoadImage":
            inputs["image"] = m["face_image"]
        elif ct == "LynxEncodeFaceID":
            inputs["detector"] = "mtcnn"
        elif ct == "WanVaceToVideo":
            inputs.update(width=W, height=H, length=FRAMES)
        elif ct == "LynxSampler":
            inputs.update(steps=1, sampler_name="euler", ref_scale=ref_scale)
        elif ct == "LynxVideoCombine":
            inputs["filename_prefix"] = prefix
    wf["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id(wf, "LynxSampler"), 0],
                                                       "filename_prefix": prefix}}
    return wf


def saved_latent(server, entry: dict) -> torch.Tensor:
    (item,) = entry["outputs"]["99"]["latents"]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def test_lynx_on_vace_skips_the_reference_frame_in_the_ref_branch(comfy_server, vace):
    with_graph = tiny_template(comfy_server, vace, 1.0, "vace_e2e/ref_on")
    with_ref = comfy_server.run(with_graph, timeout=600)
    log = comfy_server.log_tail(200_000)
    without_graph = tiny_template(comfy_server, vace, 0.0, "vace_e2e/ref_off")
    for decode in ("VAEDecode", "LynxVideoCombine"):  # the latent is enough here (the VAE is slow on the CPU)
        del without_graph[node_id(without_graph, decode)]
    without_ref = comfy_server.run(without_graph, timeout=600)

    # ComfyUI's detection made a VACE model of the tiny file and WanVaceToVideo prepended 1 frame.
    a, b = saved_latent(comfy_server, with_ref), saved_latent(comfy_server, without_ref)
    assert a.shape == b.shape == (1, 16, 1 + (FRAMES - 1) // 4 + 1, H // 8, W // 8)
    assert "VACE reference image(s) in the first 1 latent frame(s); the Ref-adapter skips their tokens" in log
    # The reference frame: untouched by the Ref-adapter, to the bit. The video frames: changed by it.
    assert torch.isfinite(a).all()
    assert torch.equal(a[:, :, :1], b[:, :, :1])
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-3
    # TrimVideoLatent cut the reference frame off: VAE Decode gave the 5 video frames.
    (video,) = with_ref["outputs"][node_id(with_graph, "LynxVideoCombine")]["videos"]
    info = probe(comfy_server.output_dir / video["subfolder"] / video["filename"])
    assert (info["width"], info["height"], info["frames"]) == (W, H, FRAMES)
