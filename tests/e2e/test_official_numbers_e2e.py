"""LynxSampler's default path inside a real ComfyUI equals lynx_core's standalone pipeline.

The standalone pipeline (``lynx_core.pipeline.generate``: the engine's WanModel, the official UniPC,
the official schedule and noise) is the engine's stand-in for the official code (its pieces are
tested against diffusers and the spec elsewhere). Here the same tiny random weights, face
embedding, prompts and seed go through both:

* ComfyUI: UNETLoader's ``load_diffusion_model``, Lynx Encode Reference, and LynxSampler with
  every widget at its default (``lynx_unipc`` + ``lynx_official``, three-pass guidance, full
  adapters with the reference), only ``steps`` lowered;
* standalone: ``load_wan`` of the same file, its own reference pass on the same VAE latents and
  "image of a face" text, ``generate`` with the same settings.

float32: the whole run agrees to ≤ 1e-4 relative (max |Δ| / max |x|). bf16 (both sides computing in
bf16; on the CPU ComfyUI would otherwise up-cast bf16 weights to float32) gives the figure that
docs/sampling.md quotes. ComfyUI's own ``uni_pc_bh2`` on the same graph is measured for contrast.
"""
from __future__ import annotations

from comfy_script import run_in_comfy

STEPS = 5

SCRIPT = r'''
import comfy.model_management as mm, comfy.sd, comfy.utils
from safetensors import safe_open
from lynx_nodes.payloads import AdaptersHandle
from lynx_nodes.reference import encode_text, vae_posterior_sample
from lynx_core.adapters import LynxAdapters
from lynx_core.face.types import FaceIdentity
from lynx_core.lynx import LynxPatch, make_conditioning
from lynx_core.pipeline import GenerationSettings, generate
from lynx_core.reference import REFERENCE_PROMPT, extract_reference_features
from lynx_core.wan.checkpoint import load_wan

steps = int(sys.argv[3])
shape = (1, 16, 3, 8, 12)
vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(models["vae"]))
with safe_open(models["te"], "pt") as te:
    te_config = json.loads(te.metadata()["lynx_e2e_umt5_config"])
clip = comfy.sd.load_clip(ckpt_paths=[models["te"]], clip_type=comfy.sd.CLIPType.WAN,
                          model_options={"umt5xxl_model_config": te_config})
prompt, negative = "a woman smiling on the beach at sunset", "worst quality, blurred background"
pos_ctx, neg_ctx, ref_ctx = (encode_text(clip, t) for t in (prompt, negative, REFERENCE_PROMPT))

g = torch.Generator().manual_seed(5)
emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
face = FaceIdentity(embedding=emb, landmarks=np.zeros((1, 5, 2), np.float32), crop112=np.zeros((1, 112, 112, 3), np.uint8),
                    crop256=(torch.rand(1, 256, 256, 3, generator=g) * 255).to(torch.uint8).numpy(),
                    faces_found=[1], chosen=[[0]], provider="cpu")
pixels = torch.from_numpy(face.reference_crop.copy()).float().div(255).unsqueeze(0)

# The Wan VAE is the slow part on the CPU: each image (face, grey) is encoded once, and both sides
# (Lynx Encode Reference and the standalone reference pass) get that same posterior sample.
import lynx_nodes.reference as node_reference
_encoded = {}
def encode_once(vae_, px, seed):
    key = (px.numpy().tobytes(), seed)
    if key not in _encoded:
        _encoded[key] = vae_posterior_sample(vae_, px, seed)
    return _encoded[key].clone()
node_reference.vae_posterior_sample = encode_once

spec = lynx_nodes.LynxSampler.INPUT_TYPES()
widgets = {**spec["required"], **spec.get("optional", {})}
defaults = {k: v[1]["default"] for k, v in widgets.items() if len(v) > 1 and isinstance(v[1], dict) and "default" in v[1]}
res = {"default_sampler": defaults["sampler_name"], "default_scheduler": defaults["scheduler"]}

def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())

_manual_cast = mm.unet_manual_cast
def run(dtype, sampler_name=None):
    # bf16 on the CPU: ComfyUI would compute in float32 on bf16 weights; keep bf16 compute, as on a GPU.
    mm.unet_manual_cast = (lambda *a, **k: None) if dtype == torch.bfloat16 else _manual_cast
    model = comfy.sd.load_diffusion_model(models["dit"], model_options={"dtype": dtype})
    mm.unet_manual_cast = _manual_cast
    dm = model.model.diffusion_model
    assert model.model.manual_cast_dtype is None and model.model.get_dtype() == dtype
    torch.manual_seed(3)
    adapters = LynxAdapters.create("full", dim=dm.dim, num_blocks=len(dm.blocks), resampler_dim=64, resampler_heads=1,
                                   resampler_dim_head=64, resampler_depth=1).to(dtype).eval().requires_grad_(False)
    handle = AdaptersHandle(adapters, "full")

    # ComfyUI: Lynx Encode Reference, then LynxSampler at its defaults.
    ref = lynx_nodes.LynxEncodeReference().encode(model, vae, clip, face, handle, 42)[0]
    kwargs = dict(defaults, model=model, adapters=handle, face=face, positive=[[pos_ctx, {}]], negative=[[neg_ctx, {}]],
                  latent_image={"samples": torch.zeros(shape)}, steps=steps, reference=ref)
    if sampler_name is not None:
        kwargs["sampler_name"] = sampler_name
    comfy_out = lynx_nodes.LynxSampler().sample(**kwargs)[0]["samples"].float()
    if sampler_name is not None:
        return comfy_out, None, None

    # Standalone: the same file through lynx_core, its own reference pass on the same VAE latents.
    wan = load_wan(models["dit"], dtype=dtype)
    latent_format = model.get_model_object("latent_format")
    refs = []
    for px in (pixels, torch.full_like(pixels, 0.5)):
        z = latent_format.process_in(encode_once(vae, px, 42))
        refs.append(extract_reference_features(wan, z.to(dtype), ref_ctx.to(dtype)))
    ref_err = max(rel(ref.cond[b].float(), refs[0][b].float()) for b in refs[0])
    patch = LynxPatch(adapters, make_conditioning(adapters, emb, refs[0], refs[1]), ip_scale=1.0, ref_scale=1.0)
    settings = GenerationSettings(seed=42, steps=steps, cfg=defaults["cfg"], cfg_id=defaults["cfg_id"],
                                  shift=defaults["shift"])
    alone = generate(wan, pos_ctx.to(dtype), neg_ctx.to(dtype), shape, settings, patch).float()
    # ComfyUI's LATENT is in the VAE's space (the sampler's output goes through process_out); the
    # standalone pipeline returns the model-space latent that the official code hands its VAE.
    alone = latent_format.process_out(alone)
    return comfy_out, alone, ref_err

c32, s32, ref32 = run(torch.float32)
res.update(fp32_rel=rel(c32, s32), fp32_ref_rel=ref32, fp32_mean_abs=float((c32 - s32).abs().mean()),
           scale=float(s32.abs().max()), finite=bool(torch.isfinite(c32).all()))
bh2, _, _ = run(torch.float32, "uni_pc_bh2")
res["uni_pc_bh2_rel"] = rel(bh2, s32)
c16, s16, ref16 = run(torch.bfloat16)
res.update(bf16_rel=rel(c16, s16), bf16_ref_rel=ref16, bf16_alone_vs_fp32=rel(s16, s32), bf16_comfy_vs_fp32=rel(c16, s32))
print("RESULT " + json.dumps(res))
'''


def test_default_lynx_sampler_equals_the_standalone_pipeline(comfy_server):
    res = run_in_comfy(comfy_server, SCRIPT, str(STEPS))
    print("official numbers:", res)
    assert (res["default_sampler"], res["default_scheduler"]) == ("lynx_unipc", "lynx_official")
    assert res["finite"] and res["scale"] > 0.1
    # float32: the whole run (5 steps, three passes, full adapters with the reference) within 1e-4.
    assert res["fp32_ref_rel"] < 1e-5
    assert res["fp32_rel"] <= 1e-4
    # ComfyUI's uni_pc_bh2 is another formulation: far outside that tolerance on the same graph.
    assert res["uni_pc_bh2_rel"] > 100 * max(res["fp32_rel"], 1e-6)
    # bf16 on both sides: bf16 rounding, the same order as bf16 vs float32 in the engine itself.
    assert res["bf16_rel"] < 5e-2
    assert res["bf16_rel"] <= 4 * max(res["bf16_alone_vs_fp32"], 1e-3)


def test_unipc_sampler_node_equals_lynx_sampler(comfy_server):
    """Lynx UniPC Sampler (official) in SamplerCustomAdvanced with Lynx Guider gives exactly what
    LynxSampler's lynx_unipc gives with the same noise, scheduler and guidance."""
    from safetensors.torch import load_file

    from test_comfy_e2e import base_graph, sampler_inputs

    info = comfy_server.object_info("LynxUniPCSampler")["LynxUniPCSampler"]
    assert info["category"] == "Lynx/sampling" and info["display_name"] == "Lynx UniPC Sampler (official)"
    assert info["output"] == ["SAMPLER"]
    g = base_graph(comfy_server, comfy_server.models["lynx_adapters_lite"])
    common = sampler_inputs(cfg_id=1.0)
    guider = {k: v for k, v in common.items()
              if k not in ("latent_image", "seed", "steps", "sampler_name", "scheduler", "shift")}
    g["11"] = {"class_type": "LynxGuider", "inputs": guider}
    g["20"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    g["21"] = {"class_type": "LynxUniPCSampler", "inputs": {}}
    g["22"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 3,
                                                          "denoise": 1.0}}
    g["23"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["20", 0], "guider": ["11", 0], "sampler": ["21", 0], "sigmas": ["22", 0], "latent_image": ["10", 0]}}
    g["24"] = {"class_type": "LynxSampler", "inputs": dict(common, seed=7, steps=3, sampler_name="lynx_unipc",
                                                           scheduler="simple")}
    g["30"] = {"class_type": "SaveLatent", "inputs": {"samples": ["23", 0], "filename_prefix": "lynx_e2e/custom"}}
    g["31"] = {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": "lynx_e2e/node"}}
    entry = comfy_server.run(g, timeout=900)

    def latent(node):
        (item,) = entry["outputs"][node]["latents"]
        return load_file(str(comfy_server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]

    custom, node = latent("30"), latent("31")
    assert custom.shape == node.shape and bool(custom.isfinite().all())
    assert custom.abs().max() > 0 and (custom == node).all()
