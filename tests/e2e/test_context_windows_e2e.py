"""Lynx with ComfyUI's context windows in a real ComfyUI (tiny random models; skipped without
COMFYUI_PATH): WAN Context Windows (Manual) -> LynxSampler, and -> LynxGuider + SamplerCustomAdvanced,
on a latent three windows long.

The proof that the adapters act in every window: with the ``batched`` schedule and no overlap the
windows are disjoint, and the fuse weights are 1, so each window's output frames come from that
window's model calls alone. A window in which the adapters did not act would give exactly the
frames of the adapters-off run (ip_scale = ref_scale = 0); every window must differ from it.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

W, H = 64, 48
LENGTH = 21            # 6 latent frames
WINDOW = 5             # WanContextWindowsManual counts pixel frames: 5 -> 2 latent frames
LATENT_FRAMES, WINDOW_FRAMES = (LENGTH - 1) // 4 + 1, (WINDOW - 1) // 4 + 1


def graph(server, windows: dict | None, scale: float, prefix: str, guider: bool = False) -> dict:
    m = server.models
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": m["diffusion_model"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "3": server.clip_loader_node(),
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a woman smiling on the beach at sunset", "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "worst quality, blurred background", "clip": ["3", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": m["face_image"]}},
        "7": {"class_type": "LoadLynxAdapters", "inputs": {"adapters": m["lynx_adapters"], "dtype": "auto"}},
        "8": {"class_type": "LynxEncodeFaceID", "inputs": {
            "image": ["6", 0], "detector": "mtcnn", "face_select": "largest", "face_index": 0,
            "arcface_backend": "torch", "on_no_face": "error"}},
        "9": {"class_type": "LynxEncodeReference", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "clip": ["3", 0], "face": ["8", 0], "adapters": ["7", 0], "seed": 42}},
        "10": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": W, "height": H, "length": LENGTH, "batch_size": 1}},
    }
    model = ["1", 0]
    if windows is not None:
        g["20"] = {"class_type": "WanContextWindowsManual", "inputs": dict(
            {"model": ["1", 0], "context_stride": 1, "closed_loop": False}, **windows)}
        model = ["20", 0]
    common = {"model": model, "adapters": ["7", 0], "face": ["8", 0], "positive": ["4", 0], "negative": ["5", 0],
              "cfg": 5.0, "cfg_id": 2.0, "ip_scale": scale, "ref_scale": scale, "start_percent": 0.0,
              "end_percent": 1.0, "blocks_to_swap": 0, "reference": ["9", 0]}
    if guider:
        g["11"] = {"class_type": "LynxGuider", "inputs": common}
        g["12"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}}
        g["13"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        g["14"] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": 2, "denoise": 1.0}}
        g["15"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["12", 0], "guider": ["11", 0], "sampler": ["13", 0], "sigmas": ["14", 0], "latent_image": ["10", 0]}}
        out = ["15", 0]
    else:
        g["11"] = {"class_type": "LynxSampler", "inputs": dict(
            common, latent_image=["10", 0], seed=42, steps=2, sampler_name="euler", scheduler="lynx_official", shift=3.0)}
        out = ["11", 0]
    g["30"] = {"class_type": "SaveLatent", "inputs": {"samples": out, "filename_prefix": prefix}}
    return g


BATCHED = {"context_length": WINDOW, "context_overlap": 0, "context_schedule": "batched", "fuse_method": "flat"}


def saved_latent(server, entry: dict) -> torch.Tensor:
    (item,) = entry["outputs"]["30"]["latents"]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def window_differences(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float((a[:, :, s:s + WINDOW_FRAMES] - b[:, :, s:s + WINDOW_FRAMES]).abs().max())
            for s in range(0, LATENT_FRAMES, WINDOW_FRAMES)]


@pytest.mark.parametrize("guider", [False, True], ids=["LynxSampler", "LynxGuider+SamplerCustomAdvanced"])
def test_adapters_act_in_every_context_window(comfy_server, guider):
    kind = "guider" if guider else "sampler"
    on = saved_latent(comfy_server, comfy_server.run(graph(comfy_server, BATCHED, 1.0, f"cw_e2e/{kind}_on", guider)))
    log = comfy_server.log_tail(100_000)
    off = saved_latent(comfy_server, comfy_server.run(graph(comfy_server, BATCHED, 0.0, f"cw_e2e/{kind}_off", guider)))
    whole = saved_latent(comfy_server, comfy_server.run(graph(comfy_server, None, 1.0, f"cw_e2e/{kind}_whole", guider)))

    assert on.shape == off.shape == whole.shape == (1, 16, LATENT_FRAMES, H // 8, W // 8)
    assert torch.isfinite(on).all()
    assert f"Using context windows {WINDOW_FRAMES} for {LATENT_FRAMES} frames" in log
    # The windows really split the video: the result differs from one call over all frames.
    assert (on - whole).abs().max() > 1e-3
    # Every window (disjoint, weight 1) carries the adapters' effect.
    diffs = window_differences(on, off)
    assert len(diffs) == 3 and min(diffs) > 1e-3, diffs


def test_overlapping_windows_run_with_the_adapters(comfy_server):
    overlapped = {"context_length": 9, "context_overlap": 4, "context_schedule": "standard_static",
                  "fuse_method": "pyramid"}  # 3 latent frames, overlap 1: windows [0-2], [2-4], [3-5]
    on = saved_latent(comfy_server, comfy_server.run(graph(comfy_server, overlapped, 1.0, "cw_e2e/overlap_on")))
    off = saved_latent(comfy_server, comfy_server.run(graph(comfy_server, overlapped, 0.0, "cw_e2e/overlap_off")))
    assert torch.isfinite(on).all()
    per_frame = (on - off).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame.shape == (LATENT_FRAMES,) and float(per_frame.min()) > 1e-3, per_frame.tolist()


def test_shipped_long_video_template_runs_on_tiny_models(comfy_server):
    """workflows/api/lynx_full_long_context_api.json as shipped, on the tiny models, with windows
    made small enough that the tiny latent still needs three of them."""
    import json
    from pathlib import Path

    from lynx_core.video import probe

    api = Path(__file__).resolve().parents[2] / "workflows" / "api" / "lynx_full_long_context_api.json"
    wf = json.loads(api.read_text())
    m = comfy_server.models
    for node in wf.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inputs["unet_name"] = m["diffusion_model"]
        elif ct == "VAELoader":
            inputs["vae_name"] = m["vae"]
        elif ct == "CLIPLoader":
            node.update(comfy_server.clip_loader_node())
        elif ct == "LoadLynxAdapters":
            inputs["adapters"] = m["lynx_adapters"]
        elif ct == "LoadImage":
            inputs["image"] = m["face_image"]
        elif ct == "LynxEncodeFaceID":
            inputs["detector"] = "mtcnn"
        elif ct == "EmptyHunyuanLatentVideo":
            inputs.update(width=W, height=H, length=LENGTH)
        elif ct == "WanContextWindowsManual":
            inputs.update(context_length=9, context_overlap=4)
        elif ct == "LynxSampler":
            inputs["steps"] = 2
        elif ct == "LynxVideoCombine":
            inputs["filename_prefix"] = "cw_e2e/template"
    entry = comfy_server.run(wf, timeout=600)
    (combine,) = [k for k, n in wf.items() if n["class_type"] == "LynxVideoCombine"]
    (video,) = entry["outputs"][combine]["videos"]
    info = probe(comfy_server.output_dir / video["subfolder"] / video["filename"])
    assert (info["width"], info["height"], info["frames"]) == (W, H, LENGTH)
    assert "Using context windows 3 for 6 frames" in comfy_server.log_tail(100_000)
