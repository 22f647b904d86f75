"""Sequence packing for training: packed == per-sample loop (outputs, loss, gradients), isolation
between samples, the runner seam, pack planning, float32 RoPE, and the refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lynx_core.adapters import LynxAdapters
from lynx_core.attention import attention_sdpa
from lynx_core.block import BlockAdapterInputs, wan_block_forward
from lynx_core.train.packed_attention import PackedLayout, segment_attention, subset_attention
from lynx_core.train.packing import (NoisySample, SampleAdapterKV, adapter_kv, looped_forward,
                                     packed_forward, plan_packs)
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope, rope_freqs

CFG = WAN_CONFIGS["tiny"]
# Token grids (1,4,6) image, (3,4,4) video, (2,6,2): latents are twice as high and wide (patch 1x2x2).
LATENTS = [(1, 8, 12), (3, 8, 8), (2, 12, 4)]
TEXT_LENS = [5, 9, 3]
REF_LENS = [16, 12, 20]
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation (30 ms per op on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model():
    torch.manual_seed(0)
    model = WanModel(CFG).eval().requires_grad_(False)
    for name, p in model.named_parameters():  # trained norms are not all ones; tell the norms apart
        if "norm" in name:
            p.add_(0.3 * torch.randn_like(p))
    return model


def _adapters(variant: str, with_ref: bool):
    torch.manual_seed(1)
    ad = LynxAdapters.create(variant, dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=64,
                             resampler_heads=4, resampler_dim_head=16, resampler_depth=2,
                             id_dim=CFG.dim if variant == "full" else 48, with_ref=with_ref)
    for p in ad.parameters():  # fresh adapters start near zero; make every path carry signal
        p.data.add_(0.05 * torch.randn_like(p))
    return ad.train()


def _data(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, *LATENTS[i % 3], generator=g) for i in range(n)]
    ts = [torch.rand((), generator=g) * 1000 for _ in range(n)]
    texts = [torch.randn(TEXT_LENS[i % 3], CFG.text_dim, generator=g) for i in range(n)]
    embs = [F.normalize(torch.randn(512, generator=g), dim=0) for _ in range(n)]
    refs = [{b: torch.randn(1, REF_LENS[i % 3], CFG.dim, generator=g) for b in range(CFG.num_layers)}
            for i in range(n)]
    targets = [torch.randn_like(x) for x in xs]
    return xs, ts, texts, embs, refs, targets


def _run(forward, model, adapters, data, ref_mask=(True, True, True), ip_mask=(True, True, True), **kw):
    """One training-like step; returns outputs, loss, adapter grads and latent grads."""
    xs, ts, texts, embs, refs, targets = data
    adapters.zero_grad(set_to_none=True)
    leaves = [x.clone().requires_grad_(True) for x in xs]
    samples = [NoisySample(x=x, timestep=t, text=c, key=f"s{j}")
               for j, (x, t, c) in enumerate(zip(leaves, ts, texts))]
    id_tokens = [adapters.encode_identity(e) for e in embs]
    calls = []

    def kv_for_block(i):
        calls.append(i)
        return [adapter_kv(adapters, i, id_tokens[j] if ip_mask[j] else None, refs[j][i] if ref_mask[j] else None)
                for j in range(len(samples))]

    outs = forward(model, samples, kv_for_block, **kw)
    loss = torch.stack([F.mse_loss(o, t) for o, t in zip(outs, targets)]).mean()
    loss.backward()
    assert calls == list(range(CFG.num_layers)), "kv_for_block is called once per block, in order"
    grads = {n: p.grad.clone() for n, p in adapters.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], loss.detach(), grads, [x.grad.clone() for x in leaves]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_same(packed, looped, adapters, expect_ref=True):
    outs_p, loss_p, grads_p, xg_p = packed
    outs_l, loss_l, grads_l, xg_l = looped
    for a, b in zip(outs_p, outs_l):
        assert a.shape == b.shape
        assert _rel(a, b) <= TOL
    assert _rel(loss_p, loss_l) <= TOL
    for a, b in zip(xg_p, xg_l):
        assert _rel(a, b) <= TOL
    assert grads_p.keys() == grads_l.keys()
    names = set(grads_l)
    # Gradients reach every trainable part: resampler, ID projections (+ registers), Ref projections.
    assert any(n.startswith("resampler.") for n in names)
    assert any(".to_k_ip." in n for n in names) and any(".to_v_ip." in n for n in names)
    if adapters.n_registers:
        assert any(n.endswith(".registers") for n in names)
    if expect_ref:
        assert any(".to_k_ref." in n for n in names) and any(".to_v_ref." in n for n in names)
    for n in names:
        assert grads_l[n].abs().max() > 0, n
        assert _rel(grads_p[n], grads_l[n]) <= TOL, n


@pytest.mark.parametrize("variant,with_ref,kernel", [
    ("full", True, "auto"), ("full", True, "mask"), ("full", True, "nested"), ("full", True, "sdpa"),
    ("lite", False, "auto"), ("lite", True, "mask"),
])
def test_packed_equals_looped(variant, with_ref, kernel):
    model, adapters, data = _model(), _adapters(variant, with_ref), _data()
    kw = dict(attention=kernel, ip_scale=0.8, ref_scale=1.3)
    looped = _run(looped_forward, model, adapters, data, **kw)
    packed = _run(packed_forward, model, adapters, data, **kw)
    _assert_same(packed, looped, adapters, expect_ref=with_ref)


@pytest.mark.parametrize("kernel", ["auto", "mask"])
def test_samples_without_reference_or_id_in_the_same_pack(kernel):
    model, adapters, data = _model(), _adapters("full", True), _data()
    masks = dict(ref_mask=(True, False, True), ip_mask=(True, True, False), attention=kernel)
    looped = _run(looped_forward, model, adapters, data, **masks)
    packed = _run(packed_forward, model, adapters, data, **masks)
    _assert_same(packed, looped, adapters)
    # ... and those samples really ran without the Ref / ID branch.
    full = _run(looped_forward, model, adapters, data)[0]
    assert not torch.allclose(looped[0][1], full[1], atol=1e-4)
    assert not torch.allclose(looped[0][2], full[2], atol=1e-4)


@pytest.mark.parametrize("variant,with_ref", [("full", True), ("lite", False)])
def test_looped_is_the_inference_block_math(variant, with_ref):
    """The per-sample reference equals the inference path: model.embed, float64 RoPE,
    BlockAdapterInputs from the layers' own key_value() (block norms applied there)."""
    model, adapters, data = _model(), _adapters(variant, with_ref), _data()
    xs, ts, texts, embs, refs, _ = data
    samples = [NoisySample(x, t, c) for x, t, c in zip(xs, ts, texts)]
    with torch.no_grad():
        ids = [adapters.encode_identity(e) for e in embs]
        looped = looped_forward(model, samples, lambda i: [adapter_kv(adapters, i, ids[j], refs[j][i])
                                                           for j in range(3)])
        for j, s in enumerate(samples):
            tok, grid, e, temb, ctx, freqs = model.embed(s.x[None], s.timestep.reshape(1), s.text[None])
            for i, blk in enumerate(model.blocks):
                ip_layer, ref_layer = adapters.ip_layer(i), adapters.ref_layer(i)
                ad = BlockAdapterInputs(
                    ip=ip_layer.key_value(ids[j], blk.cross_attn.norm_k) if ip_layer else None,
                    ref=ref_layer.key_value(refs[j][i], blk.self_attn.norm_k) if ref_layer else None)
                tok = wan_block_forward(blk, tok, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa,
                                        adapters=ad)
            expected = model.unpatchify(model.head(tok, temb), grid)[0]
            assert _rel(looped[j], expected) <= TOL


def test_no_sample_influences_another():
    model, adapters, data = _model(), _adapters("full", True), _data()
    base = _run(packed_forward, model, adapters, data)
    xs, ts, texts, embs, refs, targets = data
    g = torch.Generator().manual_seed(9)
    bumped = ([xs[0], xs[1] + torch.randn(xs[1].shape, generator=g), xs[2]],
              [ts[0], ts[1] * 0.3, ts[2]],
              [texts[0], torch.randn(7, CFG.text_dim, generator=g), texts[2]],
              [embs[0], F.normalize(torch.randn(512, generator=g), dim=0), embs[2]],
              [refs[0], {b: torch.randn(1, 9, CFG.dim, generator=g) for b in refs[1]}, refs[2]],
              targets)
    other = _run(packed_forward, model, adapters, bumped)
    assert (other[0][1] - base[0][1]).abs().max() > 1e-2  # the perturbed sample did change
    for j in (0, 2):
        assert (other[0][j] - base[0][j]).abs().max() <= 1e-6

    # Stronger: sample 0's loss sends no gradient at all into sample 1's latent.
    xs0 = [x.clone().requires_grad_(True) for x in xs]
    samples = [NoisySample(x, t, c) for x, t, c in zip(xs0, ts, texts)]
    with torch.no_grad():
        ids = [adapters.encode_identity(e) for e in embs]
    outs = packed_forward(model, samples, lambda i: [adapter_kv(adapters, i, ids[j], refs[j][i])
                                                     for j in range(3)], attention="mask")
    F.mse_loss(outs[0], targets[0]).backward()
    assert xs0[0].grad.abs().max() > 0
    assert torch.count_nonzero(xs0[1].grad) == 0 and torch.count_nonzero(xs0[2].grad) == 0


class _Recompute(torch.autograd.Function):
    """A block-swap-like runner: forward without grad, backward recomputes from the EXPLICIT tensors
    only, so a step that closed over grad-carrying tensors would lose their gradients."""

    @staticmethod
    def forward(ctx, fn, block, *tensors):
        ctx.fn, ctx.block = fn, block
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return fn(block, *tensors)

    @staticmethod
    def backward(ctx, grad):
        ins = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.fn(ctx.block, *ins)
        wanted = [t for t in ins if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *[next(got) if t.requires_grad else None for t in ins])


@pytest.mark.parametrize("forward", [packed_forward, looped_forward])
def test_runner_seam(forward):
    model, adapters, data = _model(), _adapters("full", True), _data()
    plain = _run(forward, model, adapters, data)
    seen = []

    def recording(index, block, fn, *tensors):
        assert block is model.blocks[index]
        assert all(isinstance(t, torch.Tensor) for t in tensors)
        assert tensors[0].dim() == 3 and tensors[0].shape[0] == 1 and tensors[0].shape[2] == CFG.dim
        seen.append(index)
        return _Recompute.apply(fn, block, *tensors)

    def ckpt(index, block, fn, *tensors):
        return checkpoint(fn, block, *tensors, use_reentrant=False)

    recomputed = _run(forward, model, adapters, data, runner=recording)
    assert seen[0] == 0 and seen[-1] == CFG.num_layers - 1
    assert len(seen) == CFG.num_layers * (1 if forward is packed_forward else 3)
    _assert_same(recomputed, plain, adapters)
    _assert_same(_run(forward, model, adapters, data, runner=ckpt), plain, adapters)


def test_sage_never_runs_in_training():
    model, adapters, data = _model(), _adapters("lite", False), _data()

    def sage(*_a, **_k):
        raise AssertionError("SageAttention ran in training")

    model.attention = sage  # what attention="auto" picks for inference when only sageattention is installed
    _run(packed_forward, model, adapters, data)
    _run(looped_forward, model, adapters, data)
    for name in ("sage", "SAGE"):
        with pytest.raises(ValueError, match="SageAttention must never run in training"):
            _run(packed_forward, model, adapters, data, attention=name)
    with pytest.raises(ValueError, match="unknown training attention"):
        _run(looped_forward, model, adapters, data, attention="xformers")


def test_segment_attention_kernels_agree_with_a_loop():
    torch.manual_seed(3)
    q_lens, k_lens = [5, 11, 3], [4, 2, 7]
    q, k, v = torch.randn(1, 19, 32), torch.randn(1, 13, 32), torch.randn(1, 13, 32)
    ref = torch.cat([attention_sdpa(a, b, c, 4) for a, b, c in
                     zip(q.split(q_lens, 1), k.split(k_lens, 1), v.split(k_lens, 1))], 1)
    for kernel in ("loop", "mask", "nested"):
        assert _rel(segment_attention(q, k, v, 4, q_lens, k_lens, kernel), ref) <= 1e-6
    # a sample without keys gets exactly zero (the block adds nothing for it)
    out = subset_attention(q, k[:, 4:], v[:, 4:], 4, q_lens, [0, 2, 7], "mask")
    assert torch.count_nonzero(out[:, :5]) == 0
    assert _rel(out[:, 5:], ref[:, 5:]) <= 1e-6
    with pytest.raises(ValueError, match="at least one query and one key"):
        segment_attention(q, k[:, 4:], v[:, 4:], 4, q_lens, [0, 2, 7])
    with pytest.raises(ValueError, match="segments cover"):
        segment_attention(q, k, v, 4, [5, 11, 2], k_lens)


def test_packed_modulation_is_per_sample():
    layout = PackedLayout([2, 3], [1, 1], [0, 0], [0, 0], "loop")
    n = torch.randn(1, 5, 8)
    shift, scale = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    out = layout.modulate(n, shift, scale)
    assert torch.equal(out[:, :2], n[:, :2] * (1 + scale[0]) + shift[0])
    assert torch.equal(out[:, 2:], n[:, 2:] * (1 + scale[1]) + shift[1])
    assert torch.equal(layout.gate(n, scale)[:, 2:], n[:, 2:] * scale[1])
    with pytest.raises(ValueError, match="packed modulation"):
        layout.gate(n, torch.randn(3, 1, 8))


def test_plan_packs():
    assert plan_packs([24, 48, 24, 40, 10], 64) == [[1, 4], [0, 3], [2]]
    assert plan_packs([24, 48, 24, 40, 10], 64, strategy="in_order") == [[0], [1], [2, 3], [4]]
    g = torch.Generator().manual_seed(4)
    counts = torch.randint(1, 100, (60,), generator=g).tolist()
    for strategy in ("first_fit_decreasing", "in_order"):
        packs = plan_packs(counts, 150, strategy=strategy)
        assert packs == plan_packs(counts, 150, strategy=strategy)
        assert sorted(i for p in packs for i in p) == list(range(60))
        assert all(sum(counts[i] for i in p) <= 150 for p in packs)
    ffd = plan_packs(counts, 150)
    assert len(ffd) <= len(plan_packs(counts, 150, strategy="in_order"))
    assert len(ffd) <= -(-sum(counts) // 150) + 1


def test_plan_packs_refuses_a_sample_over_budget():
    with pytest.raises(ValueError) as err:
        plan_packs([24, 48], 30, keys=["a.png#id.jpg", "b.mp4#id.jpg"])
    msg = str(err.value)
    for part in ("sample 1", "b.mp4#id.jpg", "48 tokens", "token_budget is 30", "smaller bucket"):
        assert part in msg
    with pytest.raises(ValueError, match="token_budget must be a positive"):
        plan_packs([4], 0)
    with pytest.raises(ValueError, match="unknown packing strategy"):
        plan_packs([4], 8, strategy="best_fit")


def test_rope_float32_option():
    grid = (3, 4, 4)
    f64 = rope_freqs(grid, CFG.head_dim)
    f32 = rope_freqs(grid, CFG.head_dim, dtype=torch.float32)
    assert f64.dtype == torch.complex128 and f32.dtype == torch.complex64
    assert (f32.to(torch.complex128) - f64).abs().max() <= 1e-6
    x = torch.randn(1, 48, 4, 16)
    a, b = apply_rope(x, f64), apply_rope(x, f32)
    assert a.dtype == b.dtype == x.dtype
    assert (a - b).abs().max() <= 1e-5 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="float64 or torch.float32"):
        rope_freqs(grid, CFG.head_dim, dtype=torch.float16)


def test_bad_inputs_name_the_sample_and_the_fix():
    model, adapters, data = _model(), _adapters("full", True), _data()
    xs, ts, texts, embs, refs, _ = data
    kv = lambda i: [SampleAdapterKV() for _ in range(3)]  # noqa: E731
    good = [NoisySample(x, t, c, key=f"k{j}") for j, (x, t, c) in enumerate(zip(xs, ts, texts))]
    with pytest.raises(ValueError, match="at least one sample"):
        packed_forward(model, [], kv)
    bad = list(good)
    bad[2] = NoisySample(xs[2][:, :, :5], ts[2], texts[2], key="odd.png")
    with pytest.raises(ValueError, match=r"sample 2 \(odd.png\).*not divisible by the patch"):
        packed_forward(model, bad, kv)
    bad[2] = NoisySample(xs[2], ts[2], texts[2][:0], key="nocap")
    with pytest.raises(ValueError, match=r"sample 2 \(nocap\): text must be"):
        packed_forward(model, bad, kv)
    with pytest.raises(ValueError, match="returned 2 entries for 3 samples"):
        packed_forward(model, good, lambda i: [SampleAdapterKV(), SampleAdapterKV()])
    wrong = lambda i: [SampleAdapterKV(ip=(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)))] * 3  # noqa: E731
    with pytest.raises(ValueError, match=r"kv_for_block\(0\)\[0\].ip"):
        looped_forward(model, good, wrong)
    with pytest.raises(ValueError, match="ID tokens for block 0 must be"):
        adapter_kv(adapters, 0, torch.zeros(2, 16, CFG.dim), None)
