"""LynxSampler's ``denoise`` in a real ComfyUI: video-to-video from a VAE-encoded video latent.

* In a graph: a 5-frame video (the face photo, scaled) through VAE Encode, LynxSampler with
  denoise 0.5 runs and changes the latent; denoise 1.0 gives exactly what the node gives without
  the input (SaveLatent files compared bit for bit).
* On ComfyUI's objects: with denoise the model gets the tail of the longer official schedule
  (lynx_official) or of ComfyUI's KSampler schedule (other schedulers), and starts from ComfyUI's
  σ0·noise + (1 − σ0)·latent.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from comfy_script import run_in_comfy
from test_comfy_e2e import FRAMES, H, W, base_graph, sampler_inputs

STEPS = 3


def video_graph(server, **sampler_over) -> dict:
    g = base_graph(server, server.models["lynx_adapters_lite"])
    g["30"] = {"class_type": "ImageScale", "inputs": {"image": ["6", 0], "upscale_method": "bilinear", "width": W,
                                                      "height": H, "crop": "center"}}
    g["31"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["30", 0], "amount": FRAMES}}
    g["32"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["31", 0], "vae": ["2", 0]}}
    inputs = sampler_inputs(steps=STEPS, latent_image=["32", 0], sampler_name="lynx_unipc")
    inputs.update(sampler_over)
    g["11"] = {"class_type": "LynxSampler", "inputs": inputs}
    g["40"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "lynx_e2e/denoised"}}
    g["41"] = {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": "lynx_e2e/encoded"}}
    return g


def saved_latent(server, entry: dict, node: str) -> torch.Tensor:
    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def test_denoise_on_an_encoded_video(comfy_server):
    entry = comfy_server.run(video_graph(comfy_server, denoise=0.5), timeout=900)
    encoded, half = saved_latent(comfy_server, entry, "41"), saved_latent(comfy_server, entry, "40")
    assert encoded.shape == half.shape == (1, 16, (FRAMES - 1) // 4 + 1, H // 8, W // 8)
    assert torch.isfinite(half).all()
    assert (half - encoded).abs().max() > 1e-2, "denoise 0.5 must change the encoded video"

    full = saved_latent(comfy_server, comfy_server.run(video_graph(comfy_server, denoise=1.0), timeout=900), "40")
    without = video_graph(comfy_server)
    assert "denoise" not in without["11"]["inputs"]
    plain = saved_latent(comfy_server, comfy_server.run(without, timeout=900), "40")
    assert torch.equal(full, plain), "denoise 1.0 must equal the node without the input, bit for bit"
    assert not torch.equal(full, half)


SCRIPT = r'''
import comfy.ldm.wan.model as wan_model, comfy.sample, comfy.samplers, comfy.sd, comfy.utils
from lynx_nodes.payloads import AdaptersHandle
from lynx_nodes.denoise import official_tail
from lynx_core.adapters import LynxAdapters
from lynx_core.face.types import FaceIdentity

steps = int(sys.argv[3])
model = comfy.sd.load_diffusion_model(models["dit"])
dm = model.model.diffusion_model
rec = {"t": [], "x": []}
_sin = wan_model.sinusoidal_embedding_1d
wan_model.sinusoidal_embedding_1d = lambda d, p: (rec["t"].append(p[0].item()), _sin(d, p))[1]
dm.patch_embedding.register_forward_pre_hook(lambda m, a: rec["x"].append(a[0][:1].detach().float().clone()))
torch.manual_seed(3)
handle = AdaptersHandle(LynxAdapters.create("lite", dim=dm.dim, num_blocks=len(dm.blocks), id_dim=64, resampler_dim=64,
                                            resampler_heads=1, resampler_dim_head=64, resampler_depth=1), "lite")
g = torch.Generator().manual_seed(5)
face = FaceIdentity(embedding=torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0),
                    landmarks=np.zeros((1, 5, 2), np.float32), crop112=np.zeros((1, 112, 112, 3), np.uint8),
                    crop256=np.zeros((1, 256, 256, 3), np.uint8), faces_found=[1], chosen=[[0]], provider="cpu")
cond = lambda s: [[torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(s)), {}]]
pos, neg = cond(1), cond(2)
latent = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(9)) * 0.5  # an "encoded video"
latent_format = model.get_model_object("latent_format")
res = {}
for scheduler in ("lynx_official", "simple"):
    rec["t"].clear(); rec["x"].clear()
    lynx_nodes.LynxSampler().sample(model, handle, face, pos, neg, {"samples": latent.clone()}, 42, steps, 5.0, 1.0, 1.0,
                                    1.0, 0.0, 1.0, "lynx_unipc", scheduler, 3.0, 0, denoise=0.5)
    if scheduler == "lynx_official":
        sig, ts = official_tail(steps, 3.0, 0.5)
        want_t = [float(t) for t in ts]
    else:
        sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", int(steps / 0.5))[-(steps + 1):]
        want_t = [float(s) * 1000 for s in sig[:-1]]
    s0 = float(sig[0])
    noise = comfy.sample.prepare_noise(latent, 42)
    start = s0 * noise + (1 - s0) * latent_format.process_in(latent)
    res[scheduler] = {"t": list(rec["t"]), "want_t": want_t, "calls": len(rec["x"]), "sigma0": s0,
                      "start_err": float((rec["x"][0] - start).abs().max()),
                      "pure_noise_err": float((rec["x"][0] - noise).abs().max())}
print("RESULT " + json.dumps(res))
'''


def test_denoise_schedule_and_start_on_comfyuis_objects(comfy_server):
    res = run_in_comfy(comfy_server, SCRIPT, str(STEPS))
    for scheduler, r in res.items():
        # cfg_id 1: two passes batched into one model call per step, STEPS steps, none at σ = 0.
        assert r["calls"] == STEPS, scheduler
        assert r["t"] == pytest.approx(r["want_t"], abs=1e-3), scheduler
        assert 0.3 < r["sigma0"] < 0.95
        assert r["start_err"] < 1e-5, f"{scheduler}: the start must be σ0·noise + (1 − σ0)·latent"
        assert r["pure_noise_err"] > 0.1, f"{scheduler}: an encoded latent must not get the pure-noise start"
