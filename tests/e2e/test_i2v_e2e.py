"""Lynx on Wan image-to-video models inside a real ComfyUI (CPU, tiny random models).

* graphs: Wan2.1-I2V with WanImageToVideo -> Lynx Encode Reference -> Lynx Sampler -> VAE Decode;
  the two Wan2.2-I2V experts, each its own MODEL, as two Lynx Guider + SamplerCustomAdvanced
  stages split with SplitSigmas; a 5B-shaped model is refused with both sizes named.
* ComfyUI's own objects (run in ComfyUI's Python): the Lynx block equals ComfyUI's I2V block; a
  whole Lynx sampling run whose adapters add exactly nothing equals ComfyUI's KSampler with and
  without a CLIP vision embedding (the image tokens are split as ComfyUI splits them); the
  reference pass feeds zeros for the mask + image channels.

The tiny checkpoints come from tests/e2e/tiny_models_i2v.py; skipped without COMFYUI_PATH.
"""
from __future__ import annotations

import json

import pytest
from comfy_script import run_in_comfy
from tiny_models_i2v import build_i2v_models

from lynx_core.video import read_video

W, H, FRAMES = 64, 48, 5


@pytest.fixture(scope="module")
def i2v(comfy_server) -> dict[str, str]:
    """The I2V checkpoints, written next to the fixture's T2V one (ComfyUI lists new files on demand)."""
    return build_i2v_models(comfy_server.models_dir)


def _graph(server, unet: str) -> dict:
    m = server.models
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": m["vae"]}},
        "3": server.clip_loader_node(),
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a woman smiling on the beach at sunset", "clip": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "worst quality, blurred background", "clip": ["3", 0]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": m["face_image"]}},
        "7": {"class_type": "LoadLynxAdapters", "inputs": {"adapters": m["lynx_adapters"], "dtype": "auto"}},
        "8": {"class_type": "LynxEncodeFaceID", "inputs": {
            "image": ["6", 0], "detector": "mtcnn", "face_select": "largest", "face_index": 0,
            "arcface_backend": "torch", "on_no_face": "error"}},
        "10": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["4", 0], "negative": ["5", 0], "vae": ["2", 0], "width": W, "height": H, "length": FRAMES,
            "batch_size": 1, "start_image": ["6", 0]}},
    }


def _reference(model: list) -> dict:
    return {"class_type": "LynxEncodeReference", "inputs": {
        "model": model, "vae": ["2", 0], "clip": ["3", 0], "face": ["8", 0], "adapters": ["7", 0], "seed": 42}}


def _lynx(model: list, reference: list, **extra) -> dict:
    return {"model": model, "adapters": ["7", 0], "face": ["8", 0], "positive": ["10", 0], "negative": ["10", 1],
            "cfg": 5.0, "cfg_id": 2.0, "ip_scale": 1.0, "ref_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0,
            "blocks_to_swap": 0, "reference": reference, **extra}


def _video(server, entry: dict, node: str):
    (v,) = entry["outputs"][node]["videos"]
    return read_video(server.output_dir / v["subfolder"] / v["filename"])


def _combine(images: list, fmt: str, prefix: str) -> dict:
    return {"class_type": "LynxVideoCombine", "inputs": {
        "images": images, "frame_rate": 16.0, "format": fmt, "filename_prefix": prefix, "crf": 19,
        "save_metadata": False}}


def test_wan21_i2v_graph_with_lynx_sampler(comfy_server, i2v):
    g = _graph(comfy_server, i2v["i2v21"])
    g["9"] = _reference(["1", 0])
    g["11"] = {"class_type": "LynxSampler", "inputs": _lynx(
        ["1", 0], ["9", 0], latent_image=["10", 2], seed=42, steps=2, sampler_name="euler",
        scheduler="lynx_official", shift=3.0)}
    g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}}
    g["13"] = _combine(["12", 0], "mp4", "Lynx/e2e_i2v21")
    frames = _video(comfy_server, comfy_server.run(g, timeout=900), "13")
    assert frames.shape == (FRAMES, H, W, 3)


def test_wan22_i2v_two_experts_with_lynx_guiders(comfy_server, i2v):
    """High-noise expert for the first half of the sigmas, low-noise expert for the rest; each expert
    gets its own reference features (they come from that model's blocks)."""
    g = _graph(comfy_server, i2v["i2v22_high"])
    g["20"] = {"class_type": "UNETLoader", "inputs": {"unet_name": i2v["i2v22_low"], "weight_dtype": "default"}}
    g["9"], g["21"] = _reference(["1", 0]), _reference(["20", 0])
    g["11"] = {"class_type": "LynxGuider", "inputs": _lynx(["1", 0], ["9", 0])}
    g["22"] = {"class_type": "LynxGuider", "inputs": _lynx(["20", 0], ["21", 0])}
    g["23"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 4,
                                                          "denoise": 1.0}}
    g["24"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["23", 0], "step": 2}}
    g["25"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["26"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    g["27"] = {"class_type": "DisableNoise", "inputs": {}}
    g["28"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["26", 0], "guider": ["11", 0], "sampler": ["25", 0], "sigmas": ["24", 0], "latent_image": ["10", 2]}}
    g["29"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["27", 0], "guider": ["22", 0], "sampler": ["25", 0], "sigmas": ["24", 1], "latent_image": ["28", 0]}}
    g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["29", 0], "vae": ["2", 0]}}
    g["13"] = _combine(["12", 0], "webp", "Lynx/e2e_i2v22")
    frames = _video(comfy_server, comfy_server.run(g, timeout=900), "13")
    assert frames.shape == (FRAMES, H, W, 3)


def test_model_the_adapters_cannot_fit_is_refused(comfy_server, i2v):
    g = _graph(comfy_server, i2v["other_width"])
    g["10"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": W, "height": H, "length": FRAMES,
                                                                   "batch_size": 1}}
    g["11"] = {"class_type": "LynxSampler", "inputs": _lynx(
        ["1", 0], None, positive=["4", 0], negative=["5", 0], latent_image=["10", 0], seed=42, steps=1,
        sampler_name="euler", scheduler="simple", shift=3.0, ref_scale=0.0)}
    del g["11"]["inputs"]["reference"]
    g["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["2", 0]}}
    g["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
    with pytest.raises(AssertionError, match=r"256-wide 2-block Wan model.*'model' input is 384-wide with 2 blocks"):
        comfy_server.run(g, timeout=600)


SCRIPT = r'''
import types
import comfy.sample, comfy.sd, comfy.utils
from safetensors import safe_open
from lynx_nodes.payloads import AdaptersHandle
from lynx_nodes.wan_patch import comfy_attention, comfy_rope
from lynx_core.adapters import LynxAdapters
from lynx_core.block import wan_block_forward
from lynx_core.block_i2v import split_context
from lynx_core.face.types import FaceIdentity

i2v = json.loads(sys.argv[3])
import lynx_nodes.wan_patch as wp
seen = []  # what the Lynx block patches hand the block: the context split they used
_block = wp.wan_block_forward
def recording_block(block, x, e, freqs, context, **kw):
    seen.append(None if isinstance(context, torch.Tensor) else
                [-1 if context.image is None else (0 if context.image is context.text else context.image.shape[1])])
    return _block(block, x, e, freqs, context, **kw)
wp.wan_block_forward = recording_block
def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())

vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(models["vae"]))
with safe_open(models["te"], "pt") as te:
    te_config = json.loads(te.metadata()["lynx_e2e_umt5_config"])
clip = comfy.sd.load_clip(ckpt_paths=[models["te"]], clip_type=comfy.sd.CLIPType.WAN,
                          model_options={"umt5xxl_model_config": te_config})
g = torch.Generator().manual_seed(5)
face = FaceIdentity(embedding=torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0),
                    landmarks=np.zeros((1, 5, 2), np.float32), crop112=np.zeros((1, 112, 112, 3), np.uint8),
                    crop256=(torch.rand(1, 256, 256, 3, generator=g) * 255).to(torch.uint8).numpy(),
                    faces_found=[1], chosen=[[0]], provider="cpu")
res = {}

def adapters_for(dm, silent):
    torch.manual_seed(3)
    a = LynxAdapters.create("full", dim=dm.dim, num_blocks=len(dm.blocks), resampler_dim=64, resampler_heads=1,
                            resampler_dim_head=64, resampler_depth=1)
    if silent:  # zero ID values: the IP branch adds exactly nothing
        with torch.no_grad():
            for layer in a.ip_layers.values():
                layer.to_v_ip.weight.zero_(); layer.to_v_ip.bias.zero_()
    return AdaptersHandle(a, "full")

def conds(image_latent, clip_vision):
    extra = {"concat_latent_image": image_latent, "concat_mask": mask}
    if clip_vision is not None:
        extra["clip_vision_output"] = clip_vision
    def one(seed):
        c = torch.zeros(1, 512, 4096)
        c[:, :6] = torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(seed))
        return [[c, dict(extra)]]
    return one(1), one(2)

shape = (1, 16, 2, 6, 8)
mask = torch.ones(1, 1, 2, 6, 8); mask[:, :, :1] = 0.0
image_latent = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(9))
clip_vision = types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280,
                                    generator=torch.Generator().manual_seed(11)))

def lynx(model, clip_vision, silent=True):
    pos, neg = conds(image_latent, clip_vision)
    return lynx_nodes.LynxSampler().sample(model=model, adapters=adapters_for(model.model.diffusion_model, silent),
        face=face, positive=pos, negative=neg, latent_image={"samples": torch.zeros(shape)}, seed=42, steps=2,
        cfg=1.0, cfg_id=1.0, ip_scale=1.0, ref_scale=0.0, start_percent=0.0, end_percent=1.0, sampler_name="euler",
        scheduler="simple", shift=3.0, blocks_to_swap=0)[0]["samples"]

def ksampler(model, clip_vision):
    pos, neg = conds(image_latent, clip_vision)
    latent = torch.zeros(shape)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 42), 2, 1.0, "euler", "simple", pos, neg,
                               latent, seed=42, disable_pbar=True)

ref_ctx = lynx_nodes.reference.encode_text(clip, "image of a face")
z = lynx_nodes.reference.vae_posterior_sample(vae, torch.from_numpy(face.reference_crop.copy()).float()[None] / 255, 42)

for key in ("i2v21", "i2v22"):
    model = comfy.sd.load_diffusion_model(i2v[key])
    dm = model.model.diffusion_model
    r = res[key] = {"base": type(model.model).__name__, "image_to_video": bool(model.model.image_to_video),
                    "in_dim": int(dm.patch_embedding.in_channels), "img_emb": dm.img_emb is not None,
                    "dtype": str(dm.blocks[0].self_attn.q.weight.dtype)}
    # 1) the Lynx block on ComfyUI's block, for ComfyUI's two image-token rules
    if key == "i2v21":
        blk = dm.blocks[0]
        x = torch.randn(1, 12, dm.dim, generator=torch.Generator().manual_seed(1))
        e = torch.randn(1, 1, 6, dm.dim, generator=torch.Generator().manual_seed(2)) * 0.3
        ctx = torch.randn(1, 257 + 512, dm.dim, generator=torch.Generator().manual_seed(3))
        freqs = dm.rope_encode(1, 6, 8, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            for n in (257, None):
                want = blk(x, e=e, freqs=freqs, context=ctx, context_img_len=n)
                got = wan_block_forward(blk, x, e, freqs, split_context(ctx, n), rope=comfy_rope,
                                        attention=comfy_attention({}))
                r[f"block_rel_{n}"] = rel(got, want)
            r["block_rel_unsplit"] = rel(wan_block_forward(blk, x, e, freqs, split_context(ctx, 0), rope=comfy_rope,
                                                           attention=comfy_attention({})), want)
    # 2) a whole Lynx run whose adapters add nothing equals ComfyUI's KSampler (Wan2.2-I2V has no
    # image embedder, so a CLIP vision embedding changes nothing there: only Wan2.1 runs with one)
    ks = ksampler(model, None)
    seen.clear()
    r["silent_vs_ksampler_noclip"] = rel(lynx(model, None), ks)
    r["splits_noclip"] = sorted({str(v) for v in seen})
    r["active_vs_ksampler"] = rel(lynx(model, None, silent=False), ks)
    if key == "i2v21":
        seen.clear()
        r["silent_vs_ksampler_clip"] = rel(lynx(model, clip_vision), ksampler(model, clip_vision))
        r["splits_clip"] = sorted({str(v) for v in seen})
    # 3) the reference pass: zeros for the mask + image channels, block 0 = ComfyUI's own input
    caps = {}
    hooks = [b.self_attn.register_forward_pre_hook(lambda m, a, i=i: caps.__setitem__(i, a[0].detach().clone()))
             for i, b in enumerate(dm.blocks)]
    ref = lynx_nodes.LynxEncodeReference().encode(model=model, vae=vae, clip=clip, face=face,
                                                  adapters=adapters_for(dm, False), seed=42)[0]
    r["ref_blocks"] = sorted(ref.cond)
    r["ref_shape"] = list(ref.cond[0].shape)
    zin = model.get_model_object("latent_format").process_in(z)
    with torch.no_grad():
        model.model.apply_model(zin, torch.zeros(1), c_concat=torch.zeros(1, 20, *zin.shape[2:]), c_crossattn=ref_ctx)
    r["ref_rel"] = [rel(ref.cond[b], caps[b]) for b in sorted(caps)]
    for h in hooks:
        h.remove()
print("RESULT " + json.dumps(res))
'''


def test_i2v_numbers_on_comfyui_objects(comfy_server, i2v):
    m = comfy_server.models_dir / "diffusion_models"
    paths = {"i2v21": str(m / i2v["i2v21"]), "i2v22": str(m / i2v["i2v22_low"])}
    res = run_in_comfy(comfy_server, SCRIPT, json.dumps(paths), timeout=900)
    print("I2V numbers:", json.dumps(res))  # shown with -rP
    w21, w22 = res["i2v21"], res["i2v22"]
    # ComfyUI's detection: Wan2.1-I2V with its image embedder; Wan2.2-I2V as 36-channel WAN21.
    assert (w21["base"], w21["image_to_video"], w21["in_dim"], w21["img_emb"]) == ("WAN21", True, 36, True)
    assert (w22["base"], w22["in_dim"], w22["img_emb"]) == ("WAN21", 36, False)
    assert w21["dtype"] == "torch.float32"
    # The Lynx block with no adapters is ComfyUI's I2V block (257 CLIP tokens, or none: whole context).
    assert w21["block_rel_257"] < 1e-5 and w21["block_rel_None"] < 1e-5
    assert w21["block_rel_unsplit"] > 1e-3  # the image term is really there
    # Whole runs: silent adapters = ComfyUI's KSampler, with and without a CLIP vision embedding;
    # active adapters change the result.
    assert w21["silent_vs_ksampler_clip"] < 1e-4, w21
    # ... and those runs went through the Lynx blocks with ComfyUI's split: 257 CLIP tokens, or the
    # whole context for both key/value sets without CLIP (0 here); plain tensors on Wan2.2 (None).
    assert w21["splits_clip"] == ["[257]"] and w21["splits_noclip"] == ["[0]"] and w22["splits_noclip"] == ["None"]
    for r in (w21, w22):
        assert r["silent_vs_ksampler_noclip"] < 1e-4 and r["active_vs_ksampler"] > 1e-3, r
    # Reference pass on the 36-channel models: 256 face tokens per block, computed on zeros for the
    # 20 image channels. Wan2.2-I2V: every block equals ComfyUI's own self-attention input; Wan2.1-I2V:
    # block 0 does (later blocks differ on purpose: the reference pass leaves out the image branch,
    # which ComfyUI without a CLIP embedding would run on the text).
    for r in (w21, w22):
        assert r["ref_blocks"] == [0, 1] and r["ref_shape"] == [1, 256, 256]
    assert max(w22["ref_rel"]) < 1e-5
    assert w21["ref_rel"][0] < 1e-5 and w21["ref_rel"][1] > 1e-4
