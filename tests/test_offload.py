"""Block swap (lynx_core.offload): equal outputs with and without swapping, host masters, fp8 host
storage, plan arithmetic, interrupt recovery, the ComfyUI-style hook and the benchmark smoke run.

Everything runs on the CPU (the copy stream and events become plain copies there; the ring,
pointer switching, host masters and fp8 path are the same code). A CUDA check runs only where a
GPU is present.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from lynx_core.adapters.lynx_adapters import LynxAdapters
from lynx_core.block import wan_block_forward
from lynx_core.guidance import combine_three_pass
from lynx_core.lynx import COND, UNCOND, LynxPatch, make_conditioning
from lynx_core.offload import (BlockSwapError, BlockSwapper, attach_block_swap, borrow_to_device,
                               choose_swapped, estimate_activation_bytes, fp8_dequantize, fp8_quantize,
                               move_non_block_parts, pack_chunks, plan_block_swap, wan_video_tokens)
from lynx_core.offload.host import ALIGN, align_up
from lynx_core.reference import extract_reference_features
from lynx_core.sampling import flow_sigmas, sample_euler, sample_unipc
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope

CFG = WAN_CONFIGS["tiny"].with_(num_layers=6)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls on a shared 2-core machine are dominated by thread synchronisation.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(CFG).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():  # default init leaves biases/norms trivial; make every tensor matter
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(seed: int = 1, grid=(2, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    x = torch.randn(1, 16, f, 2 * h, 2 * w, generator=g)
    ctx = torch.randn(1, 7, CFG.text_dim, generator=g)
    neg = torch.randn(1, 5, CFG.text_dim, generator=g)
    return x, ctx, neg


def euler_run(model, x, ctx, block_fn=None, steps: int = 5):
    sigmas, ts = flow_sigmas(steps, shift=3.0)

    def fn(xt, sigma, t, k):
        return model(xt, t, ctx, block_fn=block_fn).float()
    with torch.no_grad():
        return sample_euler(fn, x, sigmas, ts)


def param_ptrs(block) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in block.named_parameters()}


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------

def test_choose_swapped_placements():
    assert choose_swapped(6, 2, "tail") == [4, 5]
    assert choose_swapped(6, 0, "spread") == []
    assert choose_swapped(6, 6, "spread") == list(range(6))
    for n in (6, 40):
        for k in range(n + 1):
            s = choose_swapped(n, k, "spread")
            assert len(s) == k and len(set(s)) == k and all(0 <= i < n for i in s)
    # spread leaves resident blocks between swapped ones when it can
    s = choose_swapped(40, 20, "spread")
    assert all(b - a >= 2 for a, b in zip(s, s[1:]))


def test_plan_explicit_and_errors():
    model = make_model()
    plan = plan_block_swap(model.blocks, 2, "cpu", placement="tail")
    assert plan.swapped == [4, 5] and plan.resident == [0, 1, 2, 3]
    assert plan.num_blocks == 6 and plan.ring_size == 2
    # every block of the tiny model has the same size; the ring holds the largest streamed block
    expected = sum(align_up(p.numel() * p.element_size(), ALIGN) for p in model.blocks[0].parameters())
    assert plan.block_bytes == [expected] * 6
    assert plan.ring_bytes == 2 * expected
    assert plan.host_bytes == sum(p.numel() * p.element_size() for b in (4, 5) for p in model.blocks[b].parameters())
    text = plan.describe()
    assert "4/6 blocks resident" in text and "4-5" in text
    assert plan_block_swap(model.blocks, "3", "cpu").swapped == choose_swapped(6, 3)
    for bad in (-1, 7, "lots", 2.5, True):
        with pytest.raises(BlockSwapError, match="blocks_to_swap"):
            plan_block_swap(model.blocks, bad, "cpu")
    with pytest.raises(BlockSwapError, match="ring_size"):
        plan_block_swap(model.blocks, 2, "cpu", ring_size=0)
    with pytest.raises(BlockSwapError, match="placement"):
        plan_block_swap(model.blocks, 2, "cpu", placement="middle")
    with pytest.raises(ValueError, match="host_dtype"):
        plan_block_swap(model.blocks, 2, "cpu", host_dtype=torch.int8)


def test_plan_auto_from_free_memory(caplog):
    model = make_model()
    bb = plan_block_swap(model.blocks, 0, "cpu").block_bytes[0]
    act, reserve = 10_000, 5_000
    kw = dict(activation_bytes=act, reserve_bytes=reserve, placement="tail")
    # Planning for "meta" puts the (CPU) blocks off the device, like a model loaded to RAM for a GPU.
    plan = plan_block_swap(model.blocks, "auto", "meta", free_bytes=6 * bb + act + reserve, **kw)
    assert plan.swapped == [] and plan.ring_bytes == 0
    # room for three resident blocks plus a two-slot ring
    plan = plan_block_swap(model.blocks, "auto", "meta", free_bytes=5 * bb + act + reserve, **kw)
    assert plan.resident == [0, 1, 2] and plan.swapped == [3, 4, 5] and plan.ring_bytes == 2 * bb
    assert plan.free_bytes == 5 * bb + act + reserve
    # one byte less and one more block must go
    plan = plan_block_swap(model.blocks, "auto", "meta", free_bytes=5 * bb + act + reserve - 1, **kw)
    assert plan.resident == [0, 1]
    # a bigger activation estimate (more tokens) swaps more
    plan = plan_block_swap(model.blocks, "auto", "meta", free_bytes=5 * bb + act + reserve,
                           activation_bytes=act + bb, reserve_bytes=reserve, placement="tail")
    assert plan.resident == [0, 1]
    # blocks already on the device count as usable memory where they are
    plan = plan_block_swap(model.blocks, "auto", "cpu", free_bytes=act + reserve, **kw)
    assert plan.swapped == []
    plan = plan_block_swap(model.blocks, "auto", "cpu", free_bytes=act + reserve - 1, **kw)
    assert len(plan.swapped) == 3  # one block short, and a two-slot ring needs two more
    with caplog.at_level(logging.WARNING, logger="lynx_core.offload.plan"):
        plan = plan_block_swap(model.blocks, "auto", "meta", free_bytes=bb, **kw)
    assert plan.swapped == list(range(6)) and "out-of-memory" in caplog.text
    # auto without any measurement (CPU, no free_bytes) keeps everything resident
    assert plan_block_swap(model.blocks, "auto", "cpu").swapped == []


def test_activation_estimate_and_tokens():
    assert wan_video_tokens(81, 480, 832) == 32760
    assert wan_video_tokens(121, 480, 832) == 48360
    one = estimate_activation_bytes(32760, 5120, 13824, torch.bfloat16)
    three = estimate_activation_bytes(32760, 5120, 13824, torch.bfloat16, batch=3)
    assert 4e9 < one < 8e9  # the perf notes budget ~5-6 GB per row at 480p
    assert 2.8 * one < three < 3.0 * one + 1e6
    assert estimate_activation_bytes(32760, 5120, 13824, torch.bfloat16, rope_bytes=4) < one
    assert estimate_activation_bytes(16380, 5120, 13824, torch.bfloat16) < one
    with pytest.raises(BlockSwapError):
        estimate_activation_bytes(0, 5120, 13824)


def test_pack_chunks_powers_of_two_small_waste_and_cap():
    mb = 1 << 20
    per_block = [int(141.6 * mb)] * 2 + [int(52.4 * mb)] * 8 + [20480] * 17  # Wan 14B bf16 shapes
    sizes = per_block * 18
    pk = pack_chunks(sizes)
    assert all(c & (c - 1) == 0 for c in pk.chunk_sizes)
    need = sum(align_up(s, ALIGN) for s in sizes)
    assert need <= pk.pinned_bytes < need * 1.05
    # no overlaps and everything inside its chunk
    spans: dict[int, list[tuple[int, int]]] = {}
    for (c, off), s in zip(pk.place, sizes):
        assert c >= 0 and off % ALIGN == 0 and off + s <= pk.chunk_sizes[c]
        spans.setdefault(c, []).append((off, off + s))
    for c, sp in spans.items():
        sp.sort()
        assert all(a[1] <= b[0] for a, b in zip(sp, sp[1:]))
    # a cap: never exceeded, the rest left pageable
    cap = 3 << 30
    capped = pack_chunks(sizes, budget=cap)
    assert capped.pinned_bytes <= cap
    placed = sum(s for (c, _), s in zip(capped.place, sizes) if c >= 0)
    assert placed > 0.9 * cap and any(c < 0 for c, _ in capped.place)
    assert all(c < 0 for c, _ in pack_chunks(sizes[:5], budget=0).place)


# ------------------------------------------------------------------------------------------------
# equality over whole runs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count,ring,placement", [(6, 2, "spread"), (3, 1, "spread"), (2, 2, "tail"),
                                                  (4, 3, "spread"), (5, 5, "tail")])
def test_swapped_sampling_equals_resident(count, ring, placement):
    model = make_model()
    x, ctx, _ = inputs()
    reference = euler_run(model, x, ctx)
    plan = plan_block_swap(model.blocks, count, "cpu", ring_size=ring, placement=placement)
    with BlockSwapper(model.blocks, plan) as swapper:
        out = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention))
        loads = swapper.loads
    assert torch.equal(out, reference)
    forwards = 5
    if ring >= count:
        assert loads == count  # every streamed block stays in its slot after the first forward
    else:  # each forward reloads every block; the last prefetch may already reach the next forward
        assert count * forwards <= loads <= count * forwards + ring - 1


def lynx_block_fn(model, patch, identities):
    def fn(index, block, x, e, freqs, context):
        adapters = patch.block_inputs(index, block, identities, x.device, x.dtype)
        return wan_block_forward(block, x, e, freqs, context, rope=apply_rope, attention=model.attention,
                                 adapters=adapters)
    return fn


def test_lynx_three_pass_run_equals_resident():
    model = make_model(3)
    x, ctx, neg = inputs(4)
    torch.manual_seed(5)
    adapters = LynxAdapters.create("full", dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=32,
                                   resampler_heads=2, resampler_dim_head=16, resampler_depth=1).eval()
    g = torch.Generator().manual_seed(6)
    ref_latent = torch.randn(1, 16, 1, 8, 8, generator=g)
    grey_latent = torch.randn(1, 16, 1, 8, 8, generator=g)
    face_ctx = torch.randn(1, 4, CFG.text_dim, generator=g)
    embedding = torch.randn(512, generator=g)

    def generate(wrap=None, runner=None):
        ref_c = extract_reference_features(model, ref_latent, face_ctx, block_runner=runner)
        ref_u = extract_reference_features(model, grey_latent, face_ctx, block_runner=runner)
        patch = LynxPatch(adapters, make_conditioning(adapters, embedding, ref_c, ref_u), ip_scale=0.8, ref_scale=1.1)
        passes = [(neg, UNCOND), (neg, COND), (ctx, COND)]
        fns = [lynx_block_fn(model, patch, [ident]) for _text, ident in passes]
        if wrap is not None:
            fns = [wrap(f) for f in fns]
        sigmas, ts = flow_sigmas(4, shift=3.0)

        def model_fn(xt, sigma, t, k):
            u, i, c = (model(xt, t, text, block_fn=f) for (text, _), f in zip(passes, fns))
            return combine_three_pass(u, i, c, cfg=5.0, cfg_id=2.0).float()
        with torch.no_grad():
            return ref_c, sample_unipc(model_fn, x, sigmas, ts)

    ref_feats, reference = generate()
    plan = plan_block_swap(model.blocks, 4, "cpu", placement="spread")
    with BlockSwapper(model.blocks, plan) as swapper:
        feats, out = generate(wrap=swapper.wrap, runner=swapper.block_runner(model))
    assert sorted(feats) == sorted(ref_feats) == list(range(CFG.num_layers))
    assert all(torch.equal(feats[b], ref_feats[b]) for b in feats)
    assert torch.equal(out, reference)


# ------------------------------------------------------------------------------------------------
# host masters and the ring
# ------------------------------------------------------------------------------------------------

def test_frozen_weights_point_at_host_masters_and_into_the_ring_only_while_used():
    model = make_model()
    x, ctx, _ = inputs()
    plan = plan_block_swap(model.blocks, 3, "cpu", placement="tail", ring_size=2)
    before = {b: {n: p.detach().clone() for n, p in model.blocks[b].named_parameters()} for b in range(6)}
    swapper = BlockSwapper(model.blocks, plan)
    for b in plan.swapped:
        masters = swapper.masters(b)
        assert set(masters) == {n for n, _ in model.blocks[b].named_parameters()}
        for n, p in model.blocks[b].named_parameters():
            assert p.data_ptr() == masters[n].data_ptr()  # the module holds the host master
            assert torch.equal(masters[n], before[b][n])
    seen: dict[int, dict[str, int]] = {}

    def spy(index, block, h, e, freqs, context):
        seen[index] = param_ptrs(block)
        return block(h, e, freqs, context, attention=model.attention)
    with torch.no_grad():
        model(x, torch.tensor([500]), ctx, block_fn=swapper.wrap(spy))
    slots = [(s.buf.data_ptr(), s.buf.data_ptr() + s.buf.numel()) for s in swapper._slots]
    assert len(slots) == 2

    def in_ring(ptr):
        return any(lo <= ptr < hi for lo, hi in slots)
    for b in range(6):
        inside = [in_ring(p) for p in seen[b].values()]
        assert all(inside) if b in plan.swapped else not any(inside)
    for b in plan.swapped:  # back on the masters afterwards, weights unchanged
        for n, p in model.blocks[b].named_parameters():
            assert not in_ring(p.data_ptr()) and torch.equal(p, before[b][n])
    assert swapper.loads == 4  # blocks 3, 4, 5, and block 3 again, prefetched for the next forward
    swapper.close()
    assert not swapper.ring_allocated and swapper.attached


def test_fp8_host_storage_streams_the_fp8_rounded_weights():
    model = make_model(7)
    x, ctx, _ = inputs(8)
    original = copy.deepcopy(model)
    plan = plan_block_swap(model.blocks, 6, "cpu", host_dtype=torch.float8_e4m3fn)
    fp32_bytes = sum(p.numel() * 4 for p in original.blocks.parameters())
    assert plan.host_bytes < 0.4 * fp32_bytes

    def rounded(w):  # independent statement of the storage rule: per-row power-of-two scale
        amax = w.abs().amax(dim=1)
        s = torch.tensor([2.0 ** torch.ceil(torch.log2(a / 448.0)).item() if a > 0 else 1.0 for a in amax])
        s = torch.where(amax / s > 448.0, s * 2, s)
        return ((w / s[:, None]).to(torch.float8_e4m3fn).float() * s[:, None]).to(w.dtype)

    expected = copy.deepcopy(original)
    with torch.no_grad():
        for p in expected.blocks.parameters():
            if p.ndim == 2:
                p.copy_(rounded(p))
    captured = {}

    def spy(index, block, h, e, freqs, context):
        if index == 2:
            captured.update({n: p.detach().clone() for n, p in block.named_parameters()})
        return block(h, e, freqs, context, attention=model.attention)

    with BlockSwapper(model.blocks, plan) as swapper:
        masters = swapper.masters(2)
        assert masters["self_attn.q.weight"].dtype == torch.float8_e4m3fn
        assert masters["self_attn.q.bias"].dtype == torch.float32
        assert model.blocks[2].ffn[0].weight.dtype == torch.float8_e4m3fn  # owned: fp8 is the weight now
        with torch.no_grad():
            model(x, torch.tensor([700]), ctx, block_fn=swapper.wrap(spy))
        out = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention))
    for n, p in expected.blocks[2].named_parameters():
        assert captured[n].dtype == p.dtype
        assert torch.equal(captured[n], p), n  # matrices fp8-rounded, everything else exact
    assert not torch.equal(captured["ffn.0.weight"], original.blocks[2].ffn[0].weight)
    assert torch.equal(captured["modulation"], original.blocks[2].modulation)
    assert torch.equal(out, euler_run(expected, x, ctx))
    rel = (captured["ffn.0.weight"] - original.blocks[2].ffn[0].weight).norm() / original.blocks[2].ffn[0].weight.norm()
    assert rel < 0.05


def test_fp8_quantize_roundtrip_and_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g) * torch.logspace(-4, 2, 16)[:, None]
    w[3] = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        q, s = fp8_quantize(wd)
        assert q.dtype == torch.float8_e4m3fn and torch.isfinite(q.float()).all()
        assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))  # powers of two
        assert (q.float().abs().amax(dim=1) <= 448).all() and s[3] == 1
        back = fp8_dequantize(q, s, dtype)
        assert back.dtype == dtype
        assert torch.equal(back, (q.float() * s[:, None]).to(dtype))  # exact, order-independent
        err = ((back.float() - wd.float()).norm(dim=1) / wd.float().norm(dim=1).clamp_min(1e-30))
        assert (err[wd.float().norm(dim=1) > 0] < 0.05).all()


# ------------------------------------------------------------------------------------------------
# interrupts and errors
# ------------------------------------------------------------------------------------------------

class Stop(RuntimeError):
    pass


def test_interrupt_mid_step_leaves_model_and_swapper_usable():
    model = make_model(9)
    x, ctx, _ = inputs(10)
    reference = euler_run(model, x, ctx)
    plan = plan_block_swap(model.blocks, 3, "cpu", ring_size=2)
    swapper = BlockSwapper(model.blocks, plan)
    masters = {b: swapper.masters(b) for b in plan.swapped}
    calls = {"n": 0}

    def failing(index, block, h, e, freqs, context):
        calls["n"] += 1
        if calls["n"] == 2 * 6 + plan.swapped[1] + 1:  # third forward, inside a swapped block
            raise Stop("user pressed cancel")
        return block(h, e, freqs, context, attention=model.attention)

    with pytest.raises(Stop):
        with swapper:
            euler_run(model, x, ctx, block_fn=swapper.wrap(failing))
    assert not swapper.ring_allocated  # the `with` freed the ring
    for b in plan.swapped:
        for n, p in model.blocks[b].named_parameters():
            assert p.data_ptr() == masters[b][n].data_ptr()
    # the same swapper runs the next prompt (ring re-made), and the model runs without it too
    with swapper:
        again = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention))
    assert torch.equal(again, reference)
    assert torch.equal(euler_run(model, x, ctx), reference)


def test_failure_during_a_copy_does_not_poison_the_ring(monkeypatch):
    model = make_model(11)
    x, ctx, _ = inputs(12)
    reference = euler_run(model, x, ctx, steps=2)
    swapper = BlockSwapper(model.blocks, plan_block_swap(model.blocks, 4, "cpu", ring_size=2))
    real = swapper._copy_into
    state = {"n": 0}

    def flaky(st, buf):
        state["n"] += 1
        if state["n"] == 3:
            real(st, buf)  # half the work done, then the failure
            buf.zero_()
            raise Stop("copy failed")
        real(st, buf)
    monkeypatch.setattr(swapper, "_copy_into", flaky)
    with pytest.raises(Stop):
        euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    assert all(s.block is None or not s.in_use for s in swapper._slots)
    out = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    swapper.close()
    assert torch.equal(out, reference)


def test_attach_and_run_under_inference_mode_leave_normal_tensors():
    model = make_model(19)
    x, ctx, _ = inputs(20)
    reference = euler_run(model, x, ctx, steps=2)
    with torch.inference_mode():  # how ComfyUI samples
        swapper = attach_block_swap(model.blocks, 3, "cpu", host_dtype=torch.float8_e4m3fn, ring_size=2)
        sigmas, ts = flow_sigmas(2, shift=3.0)
        fn = swapper.wrap(attention=model.attention)
        inside = sample_euler(lambda xt, s, t, k: model(xt, t, ctx, block_fn=fn).float(), x, sigmas, ts)
    assert not any(p.is_inference() for p in model.parameters())
    outside = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    swapper.close()
    assert torch.equal(inside, outside)
    assert (inside - reference).abs().max() < 0.1 * reference.abs().max()


def test_grad_enabled_swapped_block_is_refused():
    model = make_model()
    x, ctx, _ = inputs()
    with BlockSwapper(model.blocks, plan_block_swap(model.blocks, 1, "cpu", placement="tail")) as swapper:
        with pytest.raises(BlockSwapError, match="no_grad"):
            model(x, torch.tensor([10]), ctx, block_fn=swapper.wrap(attention=model.attention))


def test_plan_for_other_blocks_is_refused():
    model, other = make_model(), WanModel(CFG.with_(num_layers=4))
    plan = plan_block_swap(model.blocks, 2, "cpu")
    with pytest.raises(BlockSwapError, match="6 blocks"):
        BlockSwapper(other.blocks, plan)
    with BlockSwapper(model.blocks, plan) as swapper:
        with pytest.raises(BlockSwapError, match="block list"):
            swapper.block_runner(other)


class _FakeCuda:
    """Stand-ins for CUDA streams and events that log every record and wait, so the ordering
    protocol can be checked on the CPU (the copies themselves run synchronously)."""

    def __init__(self):
        self.log: list[tuple] = []
        self.n = 0
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                fake.n += 1
                self.id = fake.n

            def record(self, stream=None):
                fake.log.append(("record", stream.name, self.id))

            def elapsed_time(self, other):
                return 0.0

        class Stream:
            def __init__(self, name="copy", device=None):
                self.name = name

            def wait_event(self, ev):
                fake.log.append(("wait", self.name, ev.id))

            def synchronize(self):
                pass

        self.Event, self.Stream = Event, Stream
        self.compute = Stream("compute")

    def install(self, monkeypatch):
        import contextlib
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: self.Stream("copy"))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.compute)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


@pytest.mark.parametrize("count,ring,placement", [(6, 2, "spread"), (3, 2, "tail"), (4, 1, "spread"),
                                                  (5, 3, "spread")])
def test_stream_protocol_orders_copies_and_compute(monkeypatch, count, ring, placement):
    """Every swapped block's compute waits for the event of the copy that filled its slot, and no
    copy into a slot starts before the copy stream waited for the end of the slot's last compute."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    import lynx_core.offload.swapper as sw_mod

    class LoggedSlot(sw_mod._Slot):
        def __setattr__(self, name, value):
            if name in ("ready", "free") and value is not None:
                fake.log.append(("set_" + name, id(self), value.id))
            super().__setattr__(name, value)
    monkeypatch.setattr(sw_mod, "_Slot", LoggedSlot)

    model = make_model(21)
    x, ctx, _ = inputs(22)
    reference = euler_run(model, x, ctx, steps=3)
    swapper = BlockSwapper(model.blocks, plan_block_swap(model.blocks, count, "cpu", ring_size=ring,
                                                          placement=placement), debug_timing=True)
    swapper._cuda = True  # drive the CUDA code path with the fakes above
    real_copy = swapper._copy_into

    def logged_copy(st, buf):
        slot = next(s for s in swapper._slots if s.buf is buf)
        fake.log.append(("copy", id(slot), st.index))
        real_copy(st, buf)
    monkeypatch.setattr(swapper, "_copy_into", logged_copy)

    def spy(index, block, h, e, freqs, context):
        ptr = block.self_attn.q.weight.data_ptr()
        slot = next((s for s in swapper._slots if s.buf.data_ptr() <= ptr < s.buf.data_ptr() + s.buf.numel()), None)
        fake.log.append(("compute", index, None if slot is None else id(slot)))
        return block(h, e, freqs, context, attention=model.attention)
    out = euler_run(model, x, ctx, block_fn=swapper.wrap(spy), steps=3)
    assert torch.equal(out, reference)
    swapped = set(swapper.plan.swapped)
    log = fake.log
    computes = [(p, ev) for p, ev in enumerate(log) if ev[0] == "compute"]
    assert len(computes) == 3 * 6
    for p, (_, block, slot) in computes:
        assert (slot is not None) == (block in swapped)
        if slot is None:
            continue
        fill = max(q for q in range(p) if log[q][0] == "copy" and log[q][1] == slot)
        assert log[fill][2] == block  # the slot still holds this block's copy
        ready = next(log[q][2] for q in range(fill, p) if log[q][0] == "set_ready" and log[q][1] == slot)
        assert ("wait", "compute", ready) in log[fill:p]
    for p, ev in enumerate(log):
        if ev[0] != "copy":
            continue
        frees = [q for q in range(p) if log[q][0] == "set_free" and log[q][1] == ev[1]]
        if frees:
            assert ("wait", "copy", log[frees[-1]][2]) in log[frees[-1]:p]
    # compute never waits on a free event and the copy stream never waits on a ready event
    readies = {e[2] for e in log if e[0] == "set_ready"}
    frees = {e[2] for e in log if e[0] == "set_free"}
    assert all(e[2] in readies for e in log if e[0] == "wait" and e[1] == "compute" and e[2] in readies | frees)
    assert not any(e[0] == "wait" and e[1] == "copy" and e[2] in readies for e in log)
    assert len(swapper.timings()) == 6
    swapper.close()


# ------------------------------------------------------------------------------------------------
# borrowed models (ComfyUI) and the hook
# ------------------------------------------------------------------------------------------------

def test_borrowed_model_is_restored_exactly_even_with_fp8_storage():
    model = make_model(13)
    x, ctx, _ = inputs(14)
    reference = euler_run(model, x, ctx, steps=3)
    ptrs = {b: param_ptrs(model.blocks[b]) for b in range(6)}
    values = {n: p.detach().clone() for n, p in model.blocks.named_parameters()}
    swapper = attach_block_swap(model.blocks, 3, "cpu", borrowed=True, host_dtype="fp8_e4m3fn")
    # between uses the owner's tensors are untouched
    assert all(param_ptrs(model.blocks[b]) == ptrs[b] for b in range(6))
    with swapper:
        out = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=3)
    assert not torch.equal(out, reference)  # fp8 streaming did happen
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    assert all(param_ptrs(model.blocks[b]) == ptrs[b] for b in range(6))
    for n, p in model.blocks.named_parameters():
        assert p.dtype == values[n].dtype and torch.equal(p, values[n])
    assert not swapper.attached
    assert torch.equal(euler_run(model, x, ctx, steps=3), reference)
    # next queued prompt: the closed swapper attaches again by itself
    with swapper:
        again = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=3)
    assert torch.equal(again, out)


def test_replace_patch_runs_comfy_style_block_replacement():
    model = make_model(15)
    x, ctx, _ = inputs(16)
    t = torch.tensor([321])
    with torch.no_grad():
        reference = model(x, t, ctx)
        swapper = attach_block_swap(model.blocks, 4, "cpu", borrowed=True, ring_size=2)
        patches = {("double_block", i): swapper.replace_patch(i) for i in range(6)}

        def via_patches(index, block, h, e, freqs, context):
            def original_block(args):
                return {"img": block(args["img"], args["vec"], args["pe"], args["txt"], attention=model.attention)}
            out = patches[("double_block", index)]({"img": h, "txt": context, "vec": e, "pe": freqs},
                                                   {"original_block": original_block})
            return out["img"]
        out = model(x, t, ctx, block_fn=via_patches)
        swapper.close()
    assert torch.equal(out, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_borrow_to_device_points_back_without_copying():
    layer = torch.nn.Linear(8, 8)
    ptrs = [p.data_ptr() for p in layer.parameters()]
    with borrow_to_device(layer, "cuda") as m:
        assert all(p.is_cuda for p in m.parameters())
    assert [p.data_ptr() for p in layer.parameters()] == ptrs
    assert all(p.device.type == "cpu" for p in layer.parameters())


def test_debug_timing_records_every_block():
    model = make_model()
    x, ctx, _ = inputs()
    plan = plan_block_swap(model.blocks, 2, "cpu", placement="tail")
    with BlockSwapper(model.blocks, plan, debug_timing=True) as swapper:
        with torch.no_grad():
            for _ in range(2):
                model(x, torch.tensor([5]), ctx, block_fn=swapper.wrap(attention=model.attention))
        rows = swapper.timings()
        report = swapper.timing_report()
    assert [r.block for r in rows] == list(range(6))
    assert all(r.uses == 2 for r in rows)
    assert [r.swapped for r in rows] == [False] * 4 + [True] * 2
    assert all(r.loads >= 1 and r.copy_ms >= 0 for r in rows if r.swapped)
    assert all(r.loads == 0 for r in rows if not r.swapped)
    assert all(r.compute_ms > 0 for r in rows)
    assert "stall" in report
    swapper.reset_timings()
    assert swapper.timings() == []


# ------------------------------------------------------------------------------------------------
# benchmark smoke run and CUDA
# ------------------------------------------------------------------------------------------------

def test_benchmark_script_smoke_run():
    spec = importlib.util.spec_from_file_location("bench_blockswap", REPO / "bench" / "blockswap.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--device", "cpu", "--tiny", "--steps", "1"])
    assert res["plan"]["swapped"] and res["plan"]["resident"]
    for mode in ("resident", "sync", "swapped"):
        assert res[mode]["step_s"] > 0
    assert res["swapped"]["loads"] > 0 and res["swapped"]["ratio"] > 0
    assert res["outputs_equal"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_stream_ring_matches_resident(fp8):
    model = make_model(17)
    x, ctx, _ = inputs(18)
    expected = copy.deepcopy(model).cuda()
    if fp8:
        with torch.no_grad():
            for p in expected.blocks.parameters():
                if p.ndim == 2:
                    q, s = fp8_quantize(p)
                    p.copy_(fp8_dequantize(q, s, p.dtype))
    reference = euler_run(expected, x.cuda(), ctx.cuda())
    move_non_block_parts(model, "cuda")
    plan = plan_block_swap(model.blocks, 4, "cuda", host_dtype=torch.float8_e4m3fn if fp8 else None)
    with BlockSwapper(model.blocks, plan, debug_timing=True) as swapper:
        out = euler_run(model, x.cuda(), ctx.cuda(), block_fn=swapper.wrap(attention=model.attention))
        assert swapper.pinned_bytes > 0
        for b in plan.swapped:
            assert all(p.device.type == "cpu" and p.is_pinned() for p in model.blocks[b].parameters())
        assert all(p.is_cuda for b in plan.resident for p in model.blocks[b].parameters())
    assert torch.equal(out, reference)
