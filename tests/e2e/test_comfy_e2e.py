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


# ------------------------------------------------------------------ official numbers, in-process
# ComfyUI's own modules in a subprocess (the Python that runs the server; our package is imported
# as ``lynx_nodes`` because ComfyUI's nodes.py owns the name ``nodes``), on the tiny models of the
# server fixture. Checks what a graph cannot see: the model inputs ComfyUI produces.
IN_PROCESS = r'''
import importlib.util, json, sys
from comfy.cli_args import args
args.cpu = True
import numpy as np, torch
import comfy.ldm.wan.model as wan_model, comfy.sample, comfy.sd, comfy.utils
spec = importlib.util.spec_from_file_location("lynx_nodes", sys.argv[1] + "/nodes/__init__.py",
                                              submodule_search_locations=[sys.argv[1] + "/nodes"])
lynx_nodes = importlib.util.module_from_spec(spec); sys.modules["lynx_nodes"] = lynx_nodes
spec.loader.exec_module(lynx_nodes)
import lynx_nodes.wan_patch as wp
from lynx_nodes.payloads import AdaptersHandle
from lynx_core.adapters import LynxAdapters
from lynx_core.face.types import FaceIdentity
from lynx_core.sampling.schedule import flow_sigmas
from lynx_core.seeds import initial_noise, reference_noise

models = json.loads(sys.argv[2])
model = comfy.sd.load_diffusion_model(models["dit"])
dm = model.model.diffusion_model
rec = {"t": [], "x": [], "uuids": []}
_sin = wan_model.sinusoidal_embedding_1d
wan_model.sinusoidal_embedding_1d = lambda d, p: (rec["t"].append(p[0].item()), _sin(d, p))[1]
dm.patch_embedding.register_forward_pre_hook(lambda m, a: rec["x"].append(a[0][:1].detach().clone()))
_run = wp.LynxBlockPatch._run
def run_and_record(self, args, extra):
    if self.index == 0:
        rec["uuids"].append([str(u) for u in args["transformer_options"]["uuids"]])
    return _run(self, args, extra)
wp.LynxBlockPatch._run = run_and_record

torch.manual_seed(3)
adapters = AdaptersHandle(LynxAdapters.create("full", dim=dm.dim, num_blocks=len(dm.blocks), resampler_dim=64,
                                              resampler_heads=1, resampler_dim_head=64, resampler_depth=1), "full")
def face(identity):
    n = 1 if identity else 0
    g = torch.Generator().manual_seed(5)
    return FaceIdentity(embedding=torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0) if identity else None,
                        landmarks=np.zeros((n, 5, 2), np.float32), crop112=np.zeros((n, 112, 112, 3), np.uint8),
                        crop256=(torch.rand(n, 256, 256, 3, generator=g) * 255).to(torch.uint8).numpy(),
                        faces_found=[n], chosen=[[0] * n], provider="cpu")
def cond(seed):
    c = torch.zeros(1, 512, 4096)
    c[:, :6] = torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(seed))
    return [[c, {}]]
pos, neg = cond(1), cond(2)
shape = (1, 16, 2, 6, 8)
def sample(sampler, scheduler, steps, identity=True, latent_dtype=torch.float32, cfg_id=2.0):
    for v in rec.values():
        v.clear()
    latent = {"samples": torch.zeros(shape, dtype=latent_dtype)}
    out = lynx_nodes.LynxSampler().sample(model, adapters, face(identity), pos, neg, latent, 42, steps, 5.0, cfg_id, 1.0,
                                          0.0, 0.0, 1.0, sampler, scheduler, 3.0, 0)[0]["samples"]
    return out

res = {}
sample("euler", "lynx_official", 3, latent_dtype=torch.float16)
official = initial_noise(42, shape)
res["start_max_err"] = float((rec["x"][0] - official).abs().max())
res["start_mismatch"] = float((rec["x"][0] != official).float().mean())
res["euler_t"] = sorted(set(rec["t"]), reverse=True)
res["uuids"] = rec["uuids"][:2]
sample("uni_pc_bh2", "lynx_official", 4)
res["unipc_t"] = list(rec["t"])
res["official_t4"] = flow_sigmas(4, 3.0)[1].tolist()
res["official_t3"] = flow_sigmas(3, 3.0)[1].tolist()

# No identity (pass_through): exactly ComfyUI's plain KSampler (same noise, sigmas and CFG).
plain = sample("euler", "simple", 2, identity=False)
res["plain_uuid_rows"] = [len(u) for u in rec["uuids"]]
latent = torch.zeros(shape)
ksampler = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 42), 2, 5.0, "euler", "simple", pos, neg,
                               latent, seed=42, disable_pbar=True)
res["plain_vs_ksampler"] = float((plain - ksampler).abs().max())

# Reference pass: the captured tensors are ComfyUI's own self-attention inputs at sigma 0 (t = 0)
# for the posterior sample with the seed + 1 noise, and the text is what CLIPTextEncode gives.
vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(models["vae"]))
from safetensors import safe_open
with safe_open(models["te"], "pt") as te:  # the tiny UMT5's sizes, as the e2e loader node reads them
    te_config = json.loads(te.metadata()["lynx_e2e_umt5_config"])
clip = comfy.sd.load_clip(ckpt_paths=[models["te"]], clip_type=comfy.sd.CLIPType.WAN,
                          model_options={"umt5xxl_model_config": te_config})
f = face(True)
rec["t"].clear()
ref = lynx_nodes.LynxEncodeReference().encode(model, vae, clip, f, adapters, 42)[0]
res["ref_t"] = list(rec["t"])
ctx = lynx_nodes.reference.encode_text(clip, "image of a face")
tokens = clip.tokenize("image of a face")
res["ctx_shape"] = list(ctx.shape)
res["ctx_rows"] = int((ctx.abs().sum(-1) != 0).sum())
res["ctx_tokens"] = sum(1 for t in tokens["umt5xxl"][0] if t[0] != 0)
res["ctx_is_clip_text_encode"] = bool(torch.equal(ctx, clip.encode_from_tokens_scheduled(tokens)[0][0]))
fsm = vae.first_stage_model
from comfy.ldm.wan.vae import count_conv3d
caps = {}
for i, blk in enumerate(dm.blocks):
    blk.self_attn.register_forward_pre_hook(lambda m, a, i=i: caps.__setitem__(i, a[0].detach().clone()))
errs = []
for px, feats in ((torch.from_numpy(f.reference_crop.copy()).float() / 255, ref.cond), (torch.full((256, 256, 3), 0.5), ref.uncond)):
    x = (px * 2 - 1).permute(2, 0, 1)[None, :, None].to(vae.vae_dtype)
    with torch.no_grad():
        mu, logvar = fsm.conv1(fsm.encoder(x, feat_cache=[None] * count_conv3d(fsm.decoder), feat_idx=[0])).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar.clamp(-30, 20)) * reference_noise(42, mu.shape).to(mu.dtype)
        z = model.get_model_object("latent_format").process_in(z.float())
        caps.clear()
        model.model.apply_model(z, torch.zeros(1), c_crossattn=ctx)
    errs += [float((feats[b].float() - caps[b].float()).abs().max() / caps[b].abs().max()) for b in caps]
    res["ref_tokens"] = int(feats[0].shape[1])
res["ref_rel_err"] = max(errs)
res["ref_face_vs_grey"] = float((ref.cond[0] - ref.uncond[0]).abs().max())
print("RESULT " + json.dumps(res))
'''


def test_official_numbers_inside_comfyui(comfy_server):
    """Initial noise, timesteps, cond uuids, no-identity fallback and the reference pass, measured on
    ComfyUI's own objects (the Python and ComfyUI of the server; the fixture's tiny models)."""
    import os
    import subprocess
    import sys

    from lynx_core.sampling.schedule import flow_sigmas

    repo = Path(__file__).resolve().parents[2]
    comfy = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    m = comfy_server.models_dir
    models = {"dit": str(m / "diffusion_models" / comfy_server.models["diffusion_model"]),
              "vae": str(m / "vae" / comfy_server.models["vae"]),
              "te": str(m / "text_encoders" / comfy_server.models["text_encoder"])}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(comfy), str(repo)]), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([python, "-c", IN_PROCESS, str(repo), json.dumps(models)],
                          cwd=str(comfy_server.base_dir), env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    res = json.loads(lines[-1][len("RESULT "):])

    # The official start: float32 CPU noise of the seed (even for a float16 latent), not σ0·noise;
    # at most one float32 ulp where ComfyUI multiplies by σ0 again.
    assert res["start_max_err"] <= 5e-7 and res["start_mismatch"] < 0.01
    # The official int64 timesteps reach the model, one model call per step (uni_pc_bh2 included).
    assert res["euler_t"] == [float(t) for t in res["official_t3"]]
    assert res["unipc_t"] == [float(t) for t in res["official_t4"]] == [float(t) for t in flow_sigmas(4, 3.0)[1]]
    # c, u, i batched in one call; u and i carry different uuids.
    for uuids in res["uuids"]:
        assert len(uuids) == 3 and len(set(uuids)) == 3
    # No identity: plain two-pass CFG, identical to ComfyUI's KSampler.
    assert all(n == 2 for n in res["plain_uuid_rows"])
    assert res["plain_vs_ksampler"] == 0.0
    # Reference pass at t = 0, on 256 tokens, equal to ComfyUI's own self-attention inputs.
    assert res["ref_t"] == [0.0, 0.0]
    assert res["ref_tokens"] == 256
    assert res["ref_rel_err"] < 1e-5
    assert res["ref_face_vs_grey"] > 1e-3
    # "image of a face": zero-padded to 512 (true length incl. EOS), the same as CLIPTextEncode.
    assert res["ctx_shape"] == [1, 512, 4096] and res["ctx_rows"] == res["ctx_tokens"] and res["ctx_is_clip_text_encode"]
