"""The pack inside a real ComfyUI (CPU, loopback, tiny random models): skipped without COMFYUI_PATH."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lynx_core.video import probe, read_video

OUR_NODES = {
    "LoadLynxAdapters": "Lynx/loaders",
    "LynxEncodeFaceID": "Lynx/face",
    "LynxEncodeReference": "Lynx/face",
    "LynxSampler": "Lynx/sampling",
    "LynxGuider": "Lynx/sampling",
    "LynxVideoCombine": "Lynx/video",
    "LynxFaceSimilarity": "Lynx/face",
}
W, H, FRAMES = 64, 48, 5


def base_graph(server, adapters: str, steps: int = 3) -> dict:
    """Loaders, text, face and an empty 5-frame latent (nodes 1-10)."""
    m = server.models
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": m["diffusion_model"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "3": server.clip_loader_node(),
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a woman smiling on the beach at sunset", "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "worst quality, blurred background", "clip": ["3", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": m["face_image"]}},
        "7": {"class_type": "LoadLynxAdapters", "inputs": {"adapters": adapters, "dtype": "auto"}},
        "8": {"class_type": "LynxEncodeFaceID", "inputs": {
            "image": ["6", 0], "detector": "mtcnn", "face_select": "largest", "face_index": 0,
            "arcface_backend": "torch", "on_no_face": "error"}},
        "10": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": W, "height": H, "length": FRAMES, "batch_size": 1}},
    }


def sampler_inputs(steps: int = 3, **over) -> dict:
    inputs = {"model": ["1", 0], "adapters": ["7", 0], "face": ["8", 0], "positive": ["4", 0], "negative": ["5", 0],
              "latent_image": ["10", 0], "seed": 42, "steps": steps, "cfg": 5.0, "cfg_id": 2.0, "ip_scale": 1.0,
              "ref_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0, "sampler_name": "uni_pc_bh2",
              "scheduler": "lynx_official", "shift": 3.0, "blocks_to_swap": 0}
    inputs.update(over)
    return inputs


def saved_file(server, entry: dict, node: str) -> Path:
    videos = entry["outputs"][node]["videos"]
    assert len(videos) == 1
    v = videos[0]
    return server.output_dir / v["subfolder"] / v["filename"]


def test_object_info_lists_our_nodes(comfy_server):
    info = comfy_server.object_info()
    for name, category in OUR_NODES.items():
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["category"] == category
    sampler = info["LynxSampler"]["input"]["required"]
    assert "lynx_official" in sampler["scheduler"][0]
    assert "uni_pc_bh2" in sampler["sampler_name"][0]
    # The tiny adapters placed in models/lynx are offered by the loader (folder and combined file).
    choices = info["LoadLynxAdapters"]["input"]["required"]["adapters"][0]
    assert comfy_server.models["lynx_adapters"] in choices
    assert comfy_server.models["lynx_adapters_lite"] in choices
    assert info["LynxVideoCombine"]["output_node"] is True


def test_full_lynx_video_end_to_end(comfy_server):
    g = base_graph(comfy_server, comfy_server.models["lynx_adapters"])
    g["9"] = {"class_type": "LynxEncodeReference", "inputs": {
        "model": ["1", 0], "vae": ["2", 0], "clip": ["3", 0], "face": ["8", 0], "adapters": ["7", 0], "seed": 42}}
    g["11"] = {"class_type": "LynxSampler", "inputs": sampler_inputs(reference=["9", 0])}
    g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}}
    g["13"] = {"class_type": "LynxVideoCombine", "inputs": {
        "images": ["12", 0], "frame_rate": 16.0, "format": "mp4", "filename_prefix": "Lynx/e2e_full",
        "crf": 19, "save_metadata": True}}
    g["14"] = {"class_type": "LynxFaceSimilarity", "inputs": {"images": ["12", 0], "face": ["8", 0], "detector": "mtcnn"}}
    g["15"] = {"class_type": "PreviewImage", "inputs": {"images": ["14", 2]}}
    entry = comfy_server.run(g, timeout=900)

    path = saved_file(comfy_server, entry, "13")
    assert path.is_file() and path.suffix == ".mp4"
    frames = read_video(path)
    assert frames.shape == (FRAMES, H, W, 3)
    meta = probe(path)
    assert json.loads(meta["metadata"]["prompt"])["11"]["class_type"] == "LynxSampler"

    # Counter: a second file with the same prefix never overwrites the first (a changed frame rate
    # makes ComfyUI re-run the video node only; everything upstream comes from its cache).
    g["13"]["inputs"]["frame_rate"] = 12.0
    again = saved_file(comfy_server, comfy_server.run(g, timeout=900), "13")
    assert again != path and path.is_file() and again.is_file()


def test_lite_guider_with_sampler_custom_advanced_webp(comfy_server):
    g = base_graph(comfy_server, comfy_server.models["lynx_adapters_lite"])
    guider = sampler_inputs(cfg_id=1.0)
    for key in ("latent_image", "seed", "steps", "sampler_name", "scheduler", "shift"):
        guider.pop(key)
    g["11"] = {"class_type": "LynxGuider", "inputs": guider}
    g["20"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    g["21"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["22"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 2, "denoise": 1.0}}
    g["23"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["20", 0], "guider": ["11", 0], "sampler": ["21", 0], "sigmas": ["22", 0], "latent_image": ["10", 0]}}
    g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["2", 0]}}
    g["13"] = {"class_type": "LynxVideoCombine", "inputs": {
        "images": ["12", 0], "frame_rate": 8.0, "format": "webp", "filename_prefix": "Lynx/e2e_lite",
        "crf": 19, "save_metadata": True}}
    entry = comfy_server.run(g, timeout=900)
    path = saved_file(comfy_server, entry, "13")
    assert path.suffix == ".webp"
    assert read_video(path).shape == (FRAMES, H, W, 3)


def test_interrupt_leaves_the_model_usable(comfy_server):
    g = base_graph(comfy_server, comfy_server.models["lynx_adapters_lite"])
    g["11"] = {"class_type": "LynxSampler", "inputs": sampler_inputs(steps=400, cfg_id=1.0, seed=3)}
    g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}}
    g["13"] = {"class_type": "LynxVideoCombine", "inputs": {
        "images": ["12", 0], "frame_rate": 16.0, "format": "gif", "filename_prefix": "Lynx/e2e_interrupt",
        "crf": 19, "save_metadata": False}}
    prompt_id = comfy_server.queue(g)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        running = comfy_server.request("/queue")["queue_running"]
        if running and running[0][1] == prompt_id:
            break
        time.sleep(0.1)
    time.sleep(2.0)  # let it get into the sampler
    comfy_server.interrupt()
    deadline = time.monotonic() + 300
    status = None
    while time.monotonic() < deadline:
        entry = comfy_server.request(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            status = entry["status"]
            break
        time.sleep(0.2)
    assert status is not None, "interrupted prompt never finished"
    assert status["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in status["messages"])
    assert not list((comfy_server.output_dir / "Lynx").glob("e2e_interrupt_*"))

    # The same (cached) model and adapters sample fine afterwards.
    g["11"]["inputs"]["steps"] = 2
    entry = comfy_server.run(g, timeout=900)
    assert saved_file(comfy_server, entry, "13").is_file()


def test_bad_window_is_refused_with_a_message_naming_the_input(comfy_server):
    g = base_graph(comfy_server, comfy_server.models["lynx_adapters_lite"])
    g["11"] = {"class_type": "LynxSampler", "inputs": sampler_inputs(start_percent=0.8, end_percent=0.2)}
    g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}}
    g["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
    with pytest.raises(AssertionError, match="start_percent"):
        comfy_server.run(g, timeout=300)
