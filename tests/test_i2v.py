"""Lynx on Wan image-to-video models, engine level (no ComfyUI).

* Wan2.1-I2V blocks (``cross_attn.k_img/v_img/norm_k_img``): the Lynx block with the adapters off
  equals a hand-written transcription of ComfyUI's ``WanAttentionBlock`` with ``WanI2VCrossAttention``
  for every image-token rule (CLIP tokens, no CLIP embedding, no image branch); with the IP branch on,
  its term is added to the text + image sum before the output projection.
* Wan2.2-I2V (36 input channels, no image embedder): T2V blocks, so only the input check changes.
* The MODEL check accepts image-to-video models of the adapters' size and still refuses other sizes.

The real-ComfyUI counterparts are in tests/e2e/test_i2v_e2e.py.
"""
from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

import nodes.wan_patch as wp
from lynx_core.adapters import LynxAdapters
from lynx_core.attention import attention_sdpa
from lynx_core.block import BlockAdapterInputs, wan_block_forward
from lynx_core.block_i2v import CLIP_IMAGE_TOKENS, ImageTextContext, split_context
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel, WanRMSNorm
from lynx_core.wan.rope import apply_rope, rope_freqs

CFG = WAN_CONFIGS["tiny"]
GRID = (2, 3, 4)


def add_image_branch(block: torch.nn.Module, seed: int) -> None:
    """Give a T2V block the Wan2.1-I2V cross-attention's image key/value set."""
    g = torch.Generator().manual_seed(seed)
    ca, d = block.cross_attn, CFG.dim
    ca.k_img, ca.v_img, ca.norm_k_img = torch.nn.Linear(d, d), torch.nn.Linear(d, d), WanRMSNorm(d, CFG.eps)
    with torch.no_grad():
        for p in (*ca.k_img.parameters(), *ca.v_img.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) / d ** 0.5)
        ca.norm_k_img.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))


def i2v_model(in_dim: int = 36, image_tokens: bool = True) -> WanModel:
    torch.manual_seed(1)
    model = WanModel(dataclasses.replace(CFG, in_dim=in_dim)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if image_tokens:
        for i, blk in enumerate(model.blocks):
            add_image_branch(blk, 10 + i)
    model.out_dim = CFG.out_dim  # ComfyUI's WanModel carries out_dim
    return model


# ---------------- ComfyUI's Wan I2V block, written out (explicit softmax, LayerNorm, RMSNorm) ----------
def _rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _lin(m, x):
    return x @ m.weight.T + m.bias


def _attn(q, k, v, heads):
    b, lq, c = q.shape
    d = c // heads
    out = torch.zeros(b, lq, c, dtype=q.dtype)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        out[..., sl] = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), -1) @ v[..., sl]
    return out


def comfy_i2v_block(blk, x, e, freqs, context, context_img_len, ip_kv=None, ip_scale=1.0):
    """WanAttentionBlock.forward + WanI2VCrossAttention.forward; ``context_img_len`` as ComfyUI
    passes it (None: ``context[:, :None]`` is the whole context for both key/value sets)."""
    heads = blk.num_heads
    shift, scale, gate, c_shift, c_scale, c_gate = (blk.modulation + e).chunk(6, dim=1)
    sa = blk.self_attn
    n1 = _ln(x) * (1 + scale) + shift
    q = _rms(_lin(sa.q, n1), sa.norm_q.weight)
    k = _rms(_lin(sa.k, n1), sa.norm_k.weight)
    rot = lambda t: apply_rope(t.view(*t.shape[:2], heads, -1), freqs).reshape(t.shape)  # noqa: E731
    x = x + _lin(sa.o, _attn(rot(q), rot(k), _lin(sa.v, n1), heads)) * gate

    ca = blk.cross_attn
    n2 = _ln(x) * blk.norm3.weight + blk.norm3.bias
    img, txt = context[:, :context_img_len], context[:, context_img_len:]
    q = _rms(_lin(ca.q, n2), ca.norm_q.weight)
    out = _attn(q, _rms(_lin(ca.k, txt), ca.norm_k.weight), _lin(ca.v, txt), heads)
    out = out + _attn(q, _rms(_lin(ca.k_img, img), ca.norm_k_img.weight), _lin(ca.v_img, img), heads)
    if ip_kv is not None:
        out = out + ip_scale * _attn(q, ip_kv[0].expand(x.shape[0], -1, -1), ip_kv[1].expand(x.shape[0], -1, -1),
                                     heads)
    x = x + _lin(ca.o, out)

    h = _lin(blk.ffn[0], _ln(x) * (1 + c_scale) + c_shift)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return x + _lin(blk.ffn[2], h) * c_gate


@pytest.fixture(scope="module")
def setup():
    model = i2v_model()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, math.prod(GRID), CFG.dim, generator=g)
    e = torch.randn(2, 6, CFG.dim, generator=g) * 0.3
    ctx = torch.randn(2, 5 + 7, CFG.dim, generator=g)  # 5 image tokens in front of 7 text tokens
    ip_kv = (torch.randn(1, 3, CFG.dim, generator=g), torch.randn(1, 3, CFG.dim, generator=g))
    return model.blocks[1], x, e, ctx, ip_kv


def lynx(blk, x, e, context, adapters=None):
    with torch.no_grad():
        return wan_block_forward(blk, x, e, rope_freqs(GRID, CFG.head_dim), context, rope=apply_rope,
                                 attention=attention_sdpa, adapters=adapters)


def comfy(blk, x, e, ctx, n, **kw):
    with torch.no_grad():
        return comfy_i2v_block(blk, x, e, rope_freqs(GRID, CFG.head_dim), ctx, n, **kw)


@pytest.mark.parametrize("tokens", [5, None])
def test_adapters_off_equal_comfyui_i2v_block(setup, tokens):
    blk, x, e, ctx, _ = setup
    want = comfy(blk, x, e, ctx, tokens)
    torch.testing.assert_close(lynx(blk, x, e, split_context(ctx, tokens)), want, rtol=1e-5, atol=1e-5)
    # The image term matters: leaving it out (or splitting elsewhere) gives a different block.
    assert not torch.allclose(lynx(blk, x, e, split_context(ctx, 0)), want, atol=1e-3)
    if tokens is not None:
        assert not torch.allclose(lynx(blk, x, e, split_context(ctx, tokens + 1)), want, atol=1e-3)


@pytest.mark.parametrize("ip_scale", [1.0, 0.6])
def test_ip_branch_is_added_to_text_and_image_terms(setup, ip_scale):
    blk, x, e, ctx, ip_kv = setup
    want = comfy(blk, x, e, ctx, 5, ip_kv=ip_kv, ip_scale=ip_scale)
    got = lynx(blk, x, e, split_context(ctx, 5), BlockAdapterInputs(ip=ip_kv, ip_scale=ip_scale))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, comfy(blk, x, e, ctx, 5), atol=1e-3)


def test_ref_branch_runs_on_i2v_blocks(setup):
    blk, x, e, ctx, ip_kv = setup
    ref = (torch.randn(2, 4, CFG.dim), torch.randn(2, 4, CFG.dim))
    plain = lynx(blk, x, e, split_context(ctx, 5))
    both = lynx(blk, x, e, split_context(ctx, 5), BlockAdapterInputs(ip=ip_kv, ref=ref))
    assert torch.isfinite(both).all() and not torch.allclose(both, plain, atol=1e-3)


def test_no_image_branch_is_the_t2v_cross_attention(setup):
    """The reference pass drops the image key/value set: the block then equals the same block
    without ``k_img`` (what Wan2.1-T2V computes)."""
    blk, x, e, ctx, _ = setup
    t2v = i2v_model(image_tokens=False).blocks[1]
    got = lynx(blk, x, e, ImageTextContext(text=ctx, image=None))
    assert torch.equal(got, lynx(t2v, x, e, ctx))


def test_plain_tensor_context_uses_the_257_clip_tokens(setup):
    blk, x, e, _, _ = setup
    ctx = torch.randn(2, CLIP_IMAGE_TOKENS + 6, CFG.dim)
    assert torch.equal(lynx(blk, x, e, ctx), lynx(blk, x, e, split_context(ctx, CLIP_IMAGE_TOKENS)))


def test_split_context_rules():
    ctx = torch.arange(2 * 9 * 3, dtype=torch.float32).view(2, 9, 3)
    s = split_context(ctx, 4)
    assert torch.equal(s.image, ctx[:, :4]) and torch.equal(s.text, ctx[:, 4:])
    whole = split_context(ctx, None)
    assert whole.image is ctx and whole.text is ctx
    assert split_context(ctx, 0).image is None
    assert split_context(s, 7) is s
    for bad in (9, 12, -1):
        with pytest.raises(ValueError, match="9 tokens cannot start with"):
            split_context(ctx, bad)


def test_image_tokens_wrapper_records_clip_length_and_passes_everything_on():
    state = wp.LynxRunState()
    seen = []
    wrapper = wp._image_tokens_wrapper(state)
    executor = lambda *a, **k: seen.append((a, k, state.image_tokens)) or "out"  # noqa: E731
    x, t, ctx, to = torch.zeros(1), torch.ones(1), torch.zeros(1, 3, 2), {"k": 1}
    assert wrapper(executor, x, t, ctx, torch.zeros(1, 257, 1280), None, to, extra=5) == "out"
    assert seen[-1][2] == 257 and seen[-1][0][2] is ctx and seen[-1][0][5] is to and seen[-1][1] == {"extra": 5}
    wrapper(executor, x, t, ctx, None, None, to)
    assert seen[-1][2] is None
    wrapper(executor, x, t, ctx, clip_fea=torch.zeros(1, 514, 1280))  # first/last frame: two CLIP images
    assert seen[-1][2] == 514


# ---------------- the MODEL check ----------------
def _patcher(dm):
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=dm))


@pytest.mark.parametrize("image_tokens", [True, False], ids=["wan2.1-i2v", "wan2.2-i2v"])
def test_image_to_video_models_of_the_adapters_size_are_accepted(image_tokens):
    dm = i2v_model(image_tokens=image_tokens)
    adapters = LynxAdapters.create("full", dim=CFG.dim, num_blocks=CFG.num_layers, device="meta")
    assert wp.check_model_fits(_patcher(dm), adapters)[1:] == (CFG.dim, CFG.num_layers)
    assert wp.image_condition_channels(dm) == 20
    assert wp.has_image_tokens(dm) is image_tokens


def test_t2v_model_has_no_image_condition():
    dm = WanModel(CFG)
    dm.out_dim = CFG.out_dim
    assert wp.image_condition_channels(dm) == 0 and not wp.has_image_tokens(dm)


def test_image_to_video_model_of_another_width_is_refused():
    """A 1.3B- or 5B-shaped model (other width/depth) stays refused, I2V or not, with both sizes named."""
    dm = i2v_model()
    adapters = LynxAdapters.create("full", device="meta")  # the 14B adapters
    with pytest.raises(Exception, match=r"5120-wide 40-block Wan model .*'model' input is 64-wide with 4 blocks"):
        wp.check_model_fits(_patcher(dm), adapters)


# ---------------- the image-to-video template ----------------
def test_image_to_video_template_feeds_wan_image_to_video():
    import json
    from pathlib import Path

    api = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "api" / "lynx_full_i2v_api.json").read_text())
    by = lambda t: [k for k, n in api.items() if n["class_type"] == t]  # noqa: E731
    (i2v,), (sampler,), (ref,), (enc,) = by("WanImageToVideo"), by("LynxSampler"), by("LynxEncodeReference"), \
        by("CLIPVisionEncode")
    si, wi = api[sampler]["inputs"], api[i2v]["inputs"]
    # the sampler takes WanImageToVideo's conditioning and latent; its size is the official one
    assert (si["positive"], si["negative"], si["latent_image"]) == ([i2v, 0], [i2v, 1], [i2v, 2])
    assert (wi["width"], wi["height"], wi["length"], wi["batch_size"]) == (832, 480, 81, 1)
    # the face photo is the identity, the first frame and the CLIP vision image
    photo = api[si["face"][0]]["inputs"]["image"][0]
    assert api[photo]["class_type"] == "LoadImage"
    assert wi["start_image"] == [photo, 0] and api[enc]["inputs"]["image"] == [photo, 0]
    assert wi["clip_vision_output"] == [enc, 0]
    assert api[api[enc]["inputs"]["clip_vision"][0]]["inputs"]["clip_name"] == "clip_vision_h.safetensors"
    # the same I2V model feeds the reference pass and the sampler; official sampler settings
    unet = si["model"][0]
    assert api[ref]["inputs"]["model"] == [unet, 0] and si["reference"] == [ref, 0]
    assert api[unet]["inputs"]["unet_name"] == "wan2.1_i2v_480p_14B_bf16.safetensors"
    assert (si["steps"], si["cfg"], si["cfg_id"], si["seed"], si["shift"]) == (50, 5.0, 2.0, 42, 3.0)
    assert api[ref]["inputs"]["seed"] == si["seed"]


def test_training_keeps_refusing_image_to_video_models():
    """The trainer builds a T2V DiT from the MODEL's weights: the default check still refuses I2V."""
    with pytest.raises(wp.WanModelError, match="model: .*image-to-video.*text-to-video Wan2.1-T2V-14B"):
        wp.wan_diffusion_model(_patcher(i2v_model(image_tokens=False)))
    assert wp.wan_diffusion_model(_patcher(i2v_model()), image_to_video=True)[1:] == (CFG.dim, CFG.num_layers)
