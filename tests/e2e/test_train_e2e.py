"""The training nodes inside a real ComfyUI (CPU, tiny random models): skipped without COMFYUI_PATH.

Queued over /prompt like a user's Run: progress arrives over the websocket, /interrupt leaves a
resumable checkpoint, queueing again resumes and finishes, the saved adapters are listed by Load
Lynx Adapters without a restart and generate; a MODEL that already sampled in this server trains.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

W, H, FRAMES = 64, 48, 5
DATASET = "e2e_people"


@pytest.fixture(scope="module")
def dataset(comfy_server):
    """input/lynx_datasets/e2e_people/anna: the face photo as identity, two captioned targets."""
    person = comfy_server.input_dir / "lynx_datasets" / DATASET / "anna"
    (person / "id").mkdir(parents=True, exist_ok=True)
    face = comfy_server.input_dir / comfy_server.models["face_image"]
    shutil.copyfile(face, person / "id" / "front.png")
    img = np.asarray(Image.open(face).convert("RGB"))
    Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(person / "mirrored.png")
    (person / "mirrored.txt").write_text("a woman smiling, mirrored", encoding="utf-8")
    Image.fromarray(img).save(person / "same.png")
    (person / "same.txt").write_text("a woman in a space suit", encoding="utf-8")
    return DATASET


def train_graph(server, run_name: str, steps: int, save_name: str | None = None) -> dict:
    m = server.models
    g = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": m["diffusion_model"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "3": server.clip_loader_node(),
        "7": {"class_type": "LoadLynxAdapters", "inputs": {"adapters": m["lynx_adapters_lite"], "dtype": "auto"}},
        "20": {"class_type": "LynxTrainingDataset", "inputs": {
            "dataset": DATASET, "vae": ["2", 0], "clip": ["3", 0], "detector": "mtcnn", "max_pixels": 64 * 64,
            "max_frames": 1, "frame_stride": 1, "verify_threshold": -1.0}},
        "21": {"class_type": "LynxTrainAdapters", "inputs": {
            "model": ["1", 0], "dataset": ["20", 0], "adapters": ["7", 0], "mode": "full", "steps": steps,
            "learning_rate": 1e-4, "lora_rank": 4, "token_budget": 64, "blocks_to_swap": 0, "save_every": 0,
            "run_name": run_name, "resume": "auto", "seed": 0, "variant": "lite"}},
        "22": {"class_type": "PreviewImage", "inputs": {"images": ["21", 2]}},
    }
    if save_name:
        g["23"] = {"class_type": "LynxSaveAdapters", "inputs": {"adapters": ["21", 0], "name": save_name,
                                                                "dtype": "fp32"}}
    return g


def generate_nodes(server, adapters_ref: list) -> dict:
    """Text, face, sampler and video nodes (ids 4-13) on the loaders of train_graph."""
    return {
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a woman smiling on the beach", "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "worst quality", "clip": ["3", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": server.models["face_image"]}},
        "8": {"class_type": "LynxEncodeFaceID", "inputs": {
            "image": ["6", 0], "detector": "mtcnn", "face_select": "largest", "face_index": 0,
            "arcface_backend": "torch", "on_no_face": "error"}},
        "10": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": W, "height": H, "length": FRAMES,
                                                                   "batch_size": 1}},
        "11": {"class_type": "LynxSampler", "inputs": {
            "model": ["1", 0], "adapters": adapters_ref, "face": ["8", 0], "positive": ["4", 0],
            "negative": ["5", 0], "latent_image": ["10", 0], "seed": 42, "steps": 2, "cfg": 5.0, "cfg_id": 1.0,
            "ip_scale": 1.0, "ref_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0,
            "sampler_name": "euler", "scheduler": "lynx_official", "shift": 3.0, "blocks_to_swap": 0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}},
        "13": {"class_type": "LynxVideoCombine", "inputs": {
            "images": ["12", 0], "frame_rate": 16.0, "format": "gif", "filename_prefix": "Lynx/e2e_trained",
            "crf": 19, "save_metadata": False}},
    }


def test_training_nodes_are_listed(comfy_server, dataset):
    info = comfy_server.object_info()
    for name in ("LynxTrainingDataset", "LynxTrainAdapters", "LynxSaveAdapters"):
        assert info[name]["category"] == "Lynx/training"
    assert info["LynxTrainAdapters"]["output_node"] is True
    assert dataset in info["LynxTrainingDataset"]["input"]["required"]["dataset"][0]
    assert "LOSS_MAP" in info["LynxTrainAdapters"]["output"]


def test_a_model_that_sampled_trains_saves_and_generates(comfy_server, dataset):
    server = comfy_server
    # 1. the MODEL samples first (ComfyUI loads it under inference mode)
    g = train_graph(server, "e2e_after_sampling", steps=3)
    sample_first = {k: g[k] for k in ("1", "2", "3", "7")}
    sample_first.update(generate_nodes(server, ["7", 0]))
    server.run(sample_first, timeout=900)
    # 2. the same (cached) MODEL trains, the adapters are saved and generate in the same graph
    g = train_graph(server, "e2e_after_sampling", steps=3, save_name="e2e_trained")
    g.update({k: v for k, v in generate_nodes(server, ["21", 0]).items() if k not in ("1", "2", "3", "7")})
    entry = server.run(g, timeout=900)
    assert entry["outputs"]["22"]["images"], "no loss plot on the preview node"
    assert list((server.output_dir / "Lynx").glob("e2e_trained_*.gif"))
    saved = server.models_dir / "lynx" / "e2e_trained"
    assert sorted(p.name for p in saved.iterdir()) == ["ip_layers.safetensors", "resampler.safetensors"]
    run = server.output_dir / "lynx_training" / "e2e_after_sampling"
    assert len(json.loads((run / "history.json").read_text())["loss"]) == 3
    # 3. Load Lynx Adapters lists the saved folder without a restart, and it loads and samples
    choices = server.object_info("LoadLynxAdapters")["LoadLynxAdapters"]["input"]["required"]["adapters"][0]
    assert "e2e_trained" in choices
    again = train_graph(server, "unused", steps=1)
    again = {k: again[k] for k in ("1", "2", "3")}
    again["7"] = {"class_type": "LoadLynxAdapters", "inputs": {"adapters": "e2e_trained", "dtype": "auto"}}
    again.update(generate_nodes(server, ["7", 0]))
    server.run(again, timeout=900)
    assert "Inference tensors cannot be saved for backward" not in server.log_tail(200_000)


def _progress_until(server, prompt_id: str, node: str, value: int, timeout: float = 600) -> list[dict]:
    import websocket

    ws = websocket.create_connection(f"{server.url.replace('http', 'ws')}/ws?clientId={server.client_id}",
                                     timeout=timeout)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            raw = ws.recv()
            if not isinstance(raw, str):
                continue  # previews and progress text are binary frames
            msg = json.loads(raw)
            if msg.get("type") == "progress" and msg["data"].get("prompt_id") == prompt_id:
                seen.append(msg["data"])
                if str(msg["data"].get("node")) == node and msg["data"]["value"] >= value:
                    return seen
    finally:
        ws.close()
    raise AssertionError(f"no progress {value} from node {node} within {timeout} s: {seen[-5:]}")


def test_interrupt_saves_a_state_and_queueing_again_resumes(comfy_server, dataset):
    server = comfy_server
    g = train_graph(server, "e2e_cancel", steps=400)
    prompt_id = server.queue(g)
    seen = _progress_until(server, prompt_id, "21", 2)
    assert all(p["max"] == 400 for p in seen if str(p.get("node")) == "21")
    server.interrupt()
    deadline = time.monotonic() + 300
    status = None
    while time.monotonic() < deadline:
        entry = server.request(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            status = entry["status"]
            break
        time.sleep(0.2)
    assert status is not None and status["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in status["messages"])
    run = server.output_dir / "lynx_training" / "e2e_cancel"
    states = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(states) == 1 and states[0].startswith("step_")
    stopped_at = int(states[0].split("_")[1])
    assert stopped_at >= 2 and not (run / "adapters").exists()
    # queueing again (a few more steps than were done) resumes from that state and finishes
    g["21"]["inputs"]["steps"] = stopped_at + 2
    server.run(g, timeout=900)
    history = json.loads((run / "history.json").read_text())["loss"]
    assert [r["step"] for r in history] == list(range(1, stopped_at + 3))
    assert f"resumed from {run / 'checkpoints' / states[0]}" in server.log_tail(400_000)
    assert (run / "adapters" / f"step_{stopped_at + 2:06d}" / "ip_layers.safetensors").is_file()


@pytest.mark.parametrize("name", ["lynx_train_api.json", "lynx_train_then_t2v_api.json"])
def test_shipped_training_workflows_run(comfy_server, dataset, name):
    """The API twins of the training templates, pointed at the tiny models and this dataset, made small."""
    from tests.e2e.test_queue_e2e import tiny_api

    wf = tiny_api(Path(__file__).parents[2] / "workflows" / "api" / name, comfy_server.models, "lite")
    for node in wf.values():
        inputs = node["inputs"]
        if node["class_type"] == "LynxTrainingDataset":
            inputs.update(dataset=dataset, detector="mtcnn", max_pixels=64 * 64, max_frames=1, verify_threshold=-1.0)
        elif node["class_type"] == "LynxTrainAdapters":
            inputs.update(steps=2, token_budget=64, blocks_to_swap=0, run_name=f"e2e_{Path(name).stem}")
        elif node["class_type"] == "LynxSaveAdapters":
            inputs["name"] = f"e2e_{Path(name).stem}"
        elif node["class_type"] == "LynxEncodeFaceID":
            inputs["detector"] = "mtcnn"
    entry = comfy_server.run(wf, timeout=900)
    assert (comfy_server.models_dir / "lynx" / f"e2e_{Path(name).stem}" / "ip_layers.safetensors").is_file()
    previews = [o for o in entry["outputs"].values() if o.get("images")]
    assert len(previews) >= 2  # the dataset preview and the loss plot show on their nodes
