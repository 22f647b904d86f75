"""VACE and context-window bookkeeping, without ComfyUI: which latent frames are VACE reference
images, the Ref-adapter mask they give, and the latent shape one context window sees."""
import math
from types import SimpleNamespace

import pytest
import torch

from lynx_core.attention import attention_sdpa
from lynx_core.block import BlockAdapterInputs, wan_block_forward
from lynx_core.ref_mask import RefMaskedLayout, leading_frames_keep
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope, rope_freqs
from nodes.context_windows import window_latent_shape
from nodes.vace import (VACE_CONTEXT, VaceRefFrames, is_vace_model, reference_pass_kwargs, vace_frames_wrapper,
                        vace_reference_frames)

H, W = 3, 4


def vace_context(video_frames: int, ref_frames: int = 0, keep_first: bool = False, rows: int = 1, inputs: int = 1,
                 seed: int = 0) -> torch.Tensor:
    """What ComfyUI's WAN21_Vace.extra_conds hands the model for WanVaceToVideo's conditioning:
    [B, n, 96, F, H, W] = normalised [inactive, reactive] latents + the 64-channel mask. Reference
    frames: [reference latent, process_in(process_out(0)) = 0], mask 0. ``keep_first``: the first
    video frame is a control frame to keep (mask 0), whose reactive half is the latent of grey."""
    g = torch.Generator().manual_seed(seed)
    f = ref_frames + video_frames
    ctx = torch.empty(rows, inputs, VACE_CONTEXT, f, H, W)
    ctx[:, :, :32] = torch.randn(rows, inputs, 32, f, H, W, generator=g)
    ctx[:, :, 32:] = 1.0
    ctx[:, :, 16:, :ref_frames] = 0.0
    if keep_first:
        ctx[:, :, 32:, ref_frames] = 0.0
    return ctx


def test_reference_frames_are_found_from_the_vace_conditioning():
    assert vace_reference_frames(vace_context(3, ref_frames=1)) == [1]
    assert vace_reference_frames(vace_context(3, ref_frames=2, rows=3)) == [2, 2, 2]
    # no reference image: nothing is skipped, also when the first control frame is kept (mask 0)
    assert vace_reference_frames(vace_context(3)) == [0]
    assert vace_reference_frames(vace_context(3, keep_first=True)) == [0]
    assert vace_reference_frames(vace_context(3, ref_frames=1, keep_first=True)) == [1]
    # rows differ (different conds batched together)
    both = torch.cat([vace_context(4, ref_frames=1), vace_context(3, ref_frames=2)])
    assert vace_reference_frames(both) == [1, 2]


def test_a_frame_is_a_reference_when_one_vace_input_says_so():
    ctx = vace_context(3, ref_frames=1, inputs=2)
    ctx[:, 1, 32:, 0] = 1.0  # the second VACE input has a control frame there
    assert vace_reference_frames(ctx) == [1]
    ctx[:, 0, 32:, 0] = 1.0  # neither does
    assert vace_reference_frames(ctx) == [0]


def test_no_vace_conditioning_or_an_all_blank_context_skips_nothing():
    assert vace_reference_frames(None) == []
    assert vace_reference_frames(torch.zeros(1, 96, 3, H, W)) == []       # not [B, n, 96, F, H, W]
    assert vace_reference_frames(torch.zeros(1, 1, 64, 3, H, W)) == []    # not 96 channels
    assert vace_reference_frames(torch.zeros(1, 1, 96, 3, H, W)) == [0]   # every frame blank: not WanVaceToVideo's


def test_leading_frames_keep_masks_whole_frames_per_row():
    keep = leading_frames_keep([1, 2, 0], frames=4, tokens=4 * 6)
    assert keep.shape == (3, 24, 1) and keep.dtype == torch.bool
    assert keep[0, :, 0].tolist() == [False] * 6 + [True] * 18
    assert keep[1, :, 0].tolist() == [False] * 12 + [True] * 12
    assert keep[2].all()
    assert leading_frames_keep([0, 0], frames=4, tokens=24) is None
    assert leading_frames_keep([], frames=4, tokens=24) is None
    with pytest.raises(ValueError, match="whole latent frames"):
        leading_frames_keep([1], frames=5, tokens=24)


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(1)
    cfg = WAN_CONFIGS["tiny"]
    model = WanModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    grid = (3, 2, 2)
    x = torch.randn(2, math.prod(grid), cfg.dim)
    e = torch.randn(2, 6, cfg.dim) * 0.3
    ctx = torch.randn(2, 7, cfg.dim)
    ref = (torch.randn(2, 5, cfg.dim), torch.randn(2, 5, cfg.dim))
    ip = (torch.randn(1, 3, cfg.dim), torch.randn(1, 3, cfg.dim))
    return model.blocks[0], x, e, rope_freqs(grid, cfg.head_dim), ctx, ref, ip, grid


def _run(block, ref, layout=None):
    blk, x, e, freqs, ctx, ref_kv, ip_kv, _grid = block
    adapters = BlockAdapterInputs(ip=ip_kv, ref=ref_kv if ref else None)
    with torch.no_grad():
        return wan_block_forward(blk, x, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa,
                                 adapters=adapters, layout=layout)


def test_masked_tokens_get_no_ref_output_and_the_others_are_unchanged(block):
    grid = block[-1]
    per_frame = grid[1] * grid[2]
    keep = leading_frames_keep([1, 2], frames=grid[0], tokens=block[1].shape[1])
    masked = _run(block, ref=True, layout=RefMaskedLayout(attention_sdpa, keep))
    with_ref, without_ref = _run(block, ref=True), _run(block, ref=False)
    assert not torch.equal(with_ref, without_ref)  # the Ref branch does act on this block
    for row, skipped in enumerate((1, 2)):
        cut = skipped * per_frame
        # a block reads the other tokens' inputs only, so each token's output is exactly its own branches'
        assert torch.equal(masked[row, :cut], without_ref[row, :cut])
        assert torch.equal(masked[row, cut:], with_ref[row, cut:])
        assert not torch.equal(masked[row, :cut], with_ref[row, :cut])  # what the mask prevents


def test_unmasked_layout_is_the_dense_layout(block):
    assert torch.equal(_run(block, ref=True, layout=RefMaskedLayout(attention_sdpa, None)), _run(block, ref=True))


def test_model_call_wrapper_sets_and_clears_the_frames():
    frames = VaceRefFrames()
    wrapper = vace_frames_wrapper(frames)
    seen = {}
    x = torch.zeros(2, 16, 4, 2 * H, 2 * W)  # latent [B, C, F, H, W]; tokens per frame: H*W patches

    def executor(x_, t, *args, **kwargs):
        hidden = torch.zeros(2, 4 * H * W, 8)
        seen["keep"] = frames.keep(hidden)
        seen["layout"] = frames.layout(hidden, attention_sdpa)
        return x_

    ctx = torch.cat([vace_context(3, ref_frames=1)] * 2)
    assert wrapper(executor, x, torch.zeros(2), None, vace_context=ctx) is x
    assert seen["keep"].shape == (2, 4 * H * W, 1) and int((~seen["keep"]).sum()) == 2 * H * W
    assert isinstance(seen["layout"], RefMaskedLayout)
    assert frames.skip == [] and frames.masked_calls == 1   # cleared after the call, counted
    wrapper(executor, x, torch.zeros(2), None, vace_context=torch.cat([vace_context(4)] * 2))
    assert seen["keep"] is None and seen["layout"] is None and frames.masked_calls == 1
    wrapper(executor, x, torch.zeros(2), None)  # a call without VACE conditioning
    assert seen["keep"] is None
    frames.reset()
    assert frames.masked_calls == 0


def test_one_vace_row_broadcasts_over_the_batch_but_a_mismatch_is_refused():
    frames = VaceRefFrames()
    frames.begin_call([1], 3)
    assert frames.keep(torch.zeros(3, 3 * 4, 8)).shape == (3, 12, 1)
    frames.begin_call([1, 2], 3)
    with pytest.raises(ValueError, match="rows of VACE conditioning"):
        frames.keep(torch.zeros(3, 12, 8))


def test_reference_pass_gives_vace_a_zero_context_at_strength_zero():
    vace_dm, plain_dm = SimpleNamespace(vace_blocks=[object()]), SimpleNamespace()
    assert is_vace_model(vace_dm) and not is_vace_model(plain_dm)
    x = torch.randn(1, 16, 1, 32, 32)
    assert reference_pass_kwargs(plain_dm, x) == {}
    extra = reference_pass_kwargs(vace_dm, x)
    assert extra["vace_strength"] == [0.0]
    assert extra["vace_context"].shape == (1, 1, 96, 1, 32, 32) and not extra["vace_context"].any()


def test_window_latent_shape_follows_the_context_handler():
    handler = SimpleNamespace(context_length=4, dim=2)
    assert window_latent_shape((1, 16, 21, 60, 104), {"context_handler": handler}) == (1, 16, 4, 60, 104)
    assert window_latent_shape((1, 16, 3, 60, 104), {"context_handler": handler}) == (1, 16, 3, 60, 104)
    assert window_latent_shape((1, 16, 21, 60, 104), {}) == (1, 16, 21, 60, 104)
    assert window_latent_shape((1, 16, 21, 60, 104), None) == (1, 16, 21, 60, 104)
    assert window_latent_shape((2, 16, 21), {"context_handler": SimpleNamespace(context_length=5, dim=0)}) == (2, 16, 21)
