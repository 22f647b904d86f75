"""Lynx with ComfyUI's context windows in a real ComfyUI (tiny random models; skipped without
COMFYUI_PATH): the shipped long-video template (WAN Context Windows (Manual) -> LynxSampler), made
small, and the same graph with LynxGuider + SamplerCustomAdvanced, on a latent of 6 frames.

The proof that the adapters act in every window: with the ``batched`` schedule and no overlap the
windows are disjoint, and the ``flat`` fuse weights are 1, so each window's output frames come from
that window's model calls alone. A window in which the adapters did not act would give exactly the
frames of the adapters-off run (ip_scale = ref_scale = 0); every window must differ from it.
All runs share the loaders, the face and the reference (ComfyUI caches them between prompts).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lynx_core.video import probe

TEMPLATE = Path(__file__).resolve().parents[2] / "workflows" / "api" / "lynx_full_long_context_api.json"
W, H = 64, 48
LENGTH = 21            # 6 latent frames
WINDOW = 5             # WanContextWindowsManual counts pixel frames: 5 -> 2 latent frames
LATENT_FRAMES, WINDOW_FRAMES = (LENGTH - 1) // 4 + 1, (WINDOW - 1) // 4 + 1
BATCHED = {"context_length": WINDOW, "context_overlap": 0, "context_schedule": "batched", "fuse_method": "flat"}


def node_id(wf: dict, class_type: str) -> str:
    (nid,) = [k for k, n in wf.items() if n["class_type"] == class_type]
    return nid


def tiny_template(server) -> dict:
    """The shipped template on the fixture's tiny models: 64x48, 21 frames, 2 Euler steps."""
    wf = json.loads(TEMPLATE.read_text())
    m = server.models
    for node in wf.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inputs["unet_name"] = m["diffusion_model"]
        elif ct == "VAELoader":
            inputs["vae_name"] = m["vae"]
        elif ct == "CLIPLoader":
            node.update(server.clip_loader_node())
        elif ct == "LoadLynxAdapters":
            inputs["adapters"] = m["lynx_adapters"]
        elif ct == "LoadImage":
            inputs["image"] = m["face_image"]
        elif ct == "LynxEncodeFaceID":
            inputs["detector"] = "mtcnn"
        elif ct == "EmptyHunyuanLatentVideo":
            inputs.update(width=W, height=H, length=LENGTH)
        elif ct == "LynxSampler":
            inputs.update(steps=2, sampler_name="euler")
        elif ct == "LynxVideoCombine":
            inputs["filename_prefix"] = "cw_e2e/template"
    return wf


def variant(base: dict, prefix: str, scale: float, windows: dict | None, guider: bool = False) -> dict:
    """``base`` with both adapter scales set, its sampler's latent saved (no decode), and the context
    windows changed (``windows``) or removed (None: one call over all frames)."""
    wf = copy.deepcopy(base)
    sampler, cw = node_id(wf, "LynxSampler"), node_id(wf, "WanContextWindowsManual")
    for gone in ("VAEDecode", "LynxVideoCombine"):
        del wf[node_id(wf, gone)]
    si = wf[sampler]["inputs"]
    si.update(ip_scale=scale, ref_scale=scale)
    if windows is None:
        si["model"] = wf[cw]["inputs"]["model"]
        del wf[cw]
    else:
        wf[cw]["inputs"].update(windows)
    out = [sampler, 0]
    if guider:
        keep = ("model", "adapters", "face", "positive", "negative", "cfg", "cfg_id", "ip_scale", "ref_scale",
                "start_percent", "end_percent", "blocks_to_swap", "reference")
        wf[sampler] = {"class_type": "LynxGuider", "inputs": {k: v for k, v in si.items() if k in keep}}
        wf["90"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}}
        wf["91"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        wf["92"] = {"class_type": "BasicScheduler", "inputs": {"model": si["model"], "scheduler": "simple", "steps": 2,
                                                               "denoise": 1.0}}
        wf["93"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["90", 0], "guider": [sampler, 0], "sampler": ["91", 0], "sigmas": ["92", 0],
            "latent_image": si["latent_image"]}}
        out = ["93", 0]
    wf["99"] = {"class_type": "SaveLatent", "inputs": {"samples": out, "filename_prefix": prefix}}
    return wf


def saved_latent(server, entry: dict) -> torch.Tensor:
    (item,) = entry["outputs"]["99"]["latents"]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def window_differences(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float((a[:, :, s:s + WINDOW_FRAMES] - b[:, :, s:s + WINDOW_FRAMES]).abs().max())
            for s in range(0, LATENT_FRAMES, WINDOW_FRAMES)]


@pytest.mark.parametrize("guider", [False, True], ids=["LynxSampler", "LynxGuider+SamplerCustomAdvanced"])
def test_adapters_act_in_every_context_window(comfy_server, guider):
    base, kind = tiny_template(comfy_server), "guider" if guider else "sampler"

    def run(name, scale, windows):
        return saved_latent(comfy_server, comfy_server.run(variant(base, f"cw_e2e/{kind}_{name}", scale, windows, guider)))

    on = run("on", 1.0, BATCHED)
    log = comfy_server.log_tail(100_000)
    off, whole = run("off", 0.0, BATCHED), run("whole", 1.0, None)

    assert on.shape == off.shape == whole.shape == (1, 16, LATENT_FRAMES, H // 8, W // 8)
    assert torch.isfinite(on).all()
    assert f"Using context windows {WINDOW_FRAMES} for {LATENT_FRAMES} frames" in log
    # The windows really split the video: the result differs from one call over all frames.
    assert (on - whole).abs().max() > 1e-3
    # Every window (disjoint, weight 1) carries the adapters' effect.
    diffs = window_differences(on, off)
    assert len(diffs) == 3 and min(diffs) > 1e-3, diffs


def test_shipped_long_video_template_runs_with_overlapping_windows(comfy_server):
    """The template's own schedule (standard_static, pyramid), with windows of 3 latent frames
    overlapping by 1 ([0-2], [2-4], [3-5]): it runs to a video, and every frame carries the adapters."""
    base = tiny_template(comfy_server)
    overlapped = {"context_length": 9, "context_overlap": 4}
    base[node_id(base, "WanContextWindowsManual")]["inputs"].update(overlapped)
    entry = comfy_server.run(base)
    assert "Using context windows 3 for 6 frames" in comfy_server.log_tail(100_000)
    (video,) = entry["outputs"][node_id(base, "LynxVideoCombine")]["videos"]
    info = probe(comfy_server.output_dir / video["subfolder"] / video["filename"])
    assert (info["width"], info["height"], info["frames"]) == (W, H, LENGTH)

    on = saved_latent(comfy_server, comfy_server.run(variant(base, "cw_e2e/overlap_on", 1.0, overlapped)))
    off = saved_latent(comfy_server, comfy_server.run(variant(base, "cw_e2e/overlap_off", 0.0, overlapped)))
    assert torch.isfinite(on).all()
    per_frame = (on - off).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame.shape == (LATENT_FRAMES,) and float(per_frame.min()) > 1e-3, per_frame.tolist()
