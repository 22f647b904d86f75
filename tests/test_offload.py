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
import weakref
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

            def synchronize(self):
                fake.log.append(("sync_event", self.id, fake.on_sync()))

            def elapsed_time(self, other):
                return 0.0

        class Stream:
            def __init__(self, name="copy", device=None):
                self.name = name

            def wait_event(self, ev):
                fake.log.append(("wait", self.name, ev.id))

            def synchronize(self):
                fake.log.append(("sync_stream", self.name, fake.on_sync()))

        self.Event, self.Stream = Event, Stream
        self.compute = Stream("compute")
        #: What a host sync records besides its target (a test sets it to observe the swapper's state).
        self.on_sync = lambda: None

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
    _log_slot_events(monkeypatch, fake)
    model = make_model(21)
    x, ctx, _ = inputs(22)
    reference = euler_run(model, x, ctx, steps=3)
    swapper = _fake_cuda_swapper(monkeypatch, fake, model, count, ring, placement)
    out = euler_run(model, x, ctx, block_fn=swapper.wrap(_slot_spy(fake, swapper, model)), steps=3)
    assert torch.equal(out, reference)
    _check_stream_protocol(fake.log, set(swapper.plan.swapped), forwards=3)
    assert len(swapper.timings()) == 6
    swapper.close()


def _log_slot_events(monkeypatch, fake) -> None:
    import lynx_core.offload.swapper as sw_mod

    class LoggedSlot(sw_mod._Slot):
        def __setattr__(self, name, value):
            if name in ("ready", "free") and value is not None:
                fake.log.append(("set_" + name, id(self), value.id))
            super().__setattr__(name, value)
    monkeypatch.setattr(sw_mod, "_Slot", LoggedSlot)


def _fake_cuda_swapper(monkeypatch, fake, model, count, ring, placement, **plan_kw):
    """A swapper on the CPU whose CUDA code path runs against the fakes, with every copy logged."""
    swapper = BlockSwapper(model.blocks, plan_block_swap(model.blocks, count, "cpu", ring_size=ring,
                                                          placement=placement, **plan_kw), debug_timing=True)
    swapper.close()       # the ring made at attach had no copy stream; the next use makes one
    swapper._cuda = True  # drive the CUDA code path with the fakes
    real_copy = swapper._copy_into

    def logged_copy(st, buf):
        slot = next(s for s in swapper._slots if s.buf is buf)
        fake.log.append(("copy", id(slot), st.index))
        real_copy(st, buf)
    monkeypatch.setattr(swapper, "_copy_into", logged_copy)
    return swapper


def _slot_spy(fake, swapper, model, fail_at=None):
    """A BlockFn that logs which ring slot (if any) the block's weights point into."""
    calls = {"n": 0}

    def spy(index, block, h, e, freqs, context):
        calls["n"] += 1
        ptr = block.self_attn.q.weight.data_ptr()
        slot = next((s for s in swapper._slots if s.buf.data_ptr() <= ptr < s.buf.data_ptr() + s.buf.numel()), None)
        fake.log.append(("compute", index, None if slot is None else id(slot)))
        if fail_at is not None and calls["n"] == fail_at:
            raise Stop("aborted model call")
        return block(h, e, freqs, context, attention=model.attention)
    return spy


def _check_stream_protocol(log, swapped, forwards=None):
    computes = [(p, ev) for p, ev in enumerate(log) if ev[0] == "compute"]
    if forwards is not None:
        assert len(computes) == forwards * 6
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


def test_aborted_model_call_then_repeated_calls_keep_the_protocol(monkeypatch):
    """ComfyUI runs blocks 0..N-1 once per model call (several calls per step when it does not batch
    the conds) and may abort a call halfway: the prefetch wraps to block 0 of the next call, and
    after an abort the slots holding mid-model blocks are reloaded with the right ones."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    _log_slot_events(monkeypatch, fake)
    model = make_model(23)
    x, ctx, _ = inputs(24)
    t = torch.tensor([400])
    with torch.no_grad():
        reference = model(x, t, ctx)
        swapper = _fake_cuda_swapper(monkeypatch, fake, model, 4, 2, "spread")
        with pytest.raises(Stop):
            model(x, t, ctx, block_fn=swapper.wrap(_slot_spy(fake, swapper, model, fail_at=4)))
        assert not any(s.in_use for s in swapper._slots)
        outs = [model(x, t, ctx, block_fn=swapper.wrap(_slot_spy(fake, swapper, model))) for _ in range(3)]
    assert all(torch.equal(o, reference) for o in outs)
    _check_stream_protocol(fake.log, set(swapper.plan.swapped))
    swapper.close()


def test_close_waits_for_copies_and_last_computes_before_freeing_the_ring(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)
    _log_slot_events(monkeypatch, fake)
    model = make_model(25)
    x, ctx, _ = inputs(26)
    swapper = _fake_cuda_swapper(monkeypatch, fake, model, 3, 2, "tail")
    with torch.no_grad():
        model(x, torch.tensor([300]), ctx, block_fn=swapper.wrap(attention=model.attention))
    last_free = {}
    for ev in fake.log:
        if ev[0] == "set_free":
            last_free[ev[1]] = ev[2]
    assert len(last_free) == 2
    fake.on_sync = lambda: swapper.ring_allocated  # was the ring still there when the host waited?
    start = len(fake.log)
    swapper.close()
    syncs = fake.log[start:]
    assert ("sync_stream", "copy", True) in syncs
    assert all(("sync_event", ev, True) in syncs for ev in last_free.values())
    assert not swapper.ring_allocated


def test_ring_is_made_at_attach_with_the_size_the_plan_counted():
    model = make_model(27)
    for host_dtype in (None, "fp8_e4m3fn"):
        plan = plan_block_swap(model.blocks, 3, "cpu", host_dtype=host_dtype)
        with BlockSwapper(model.blocks, plan) as swapper:
            assert swapper.ring_allocated and swapper.device_bytes == plan.ring_bytes > 0
        assert not swapper.ring_allocated and swapper.device_bytes == 0


def test_owned_fp8_swapper_runs_again_after_close():
    """An interrupted run closes the swapper; the next prompt reuses it (the fp8 staging buffer
    included)."""
    model = make_model(35)
    x, ctx, _ = inputs(36)
    swapper = BlockSwapper(model.blocks, plan_block_swap(model.blocks, 3, "cpu", host_dtype="fp8_e4m3fn"))
    with swapper:
        first = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    assert not swapper.ring_allocated
    with swapper:
        again = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    assert torch.equal(first, again)


def test_out_of_memory_while_making_the_ring_leaves_no_half_ring(monkeypatch):
    model = make_model(33)
    x, ctx, _ = inputs(34)
    swapper = BlockSwapper(model.blocks, plan_block_swap(model.blocks, 3, "cpu", host_dtype="fp8_e4m3fn"))
    with swapper:
        reference = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    staging = swapper._staging_bytes
    assert staging > 0
    real_empty = torch.empty
    armed = {"on": True}

    def empty(*args, **kw):  # the staging buffer, the last of the ring's buffers, does not fit
        if armed["on"] and args and args[0] == staging and kw.get("device") is not None:
            armed["on"] = False
            raise torch.OutOfMemoryError("no room for the fp8 staging buffer")
        return real_empty(*args, **kw)
    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(torch.OutOfMemoryError):
        euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    assert not swapper.ring_allocated and not armed["on"]
    out = euler_run(model, x, ctx, block_fn=swapper.wrap(attention=model.attention), steps=2)
    swapper.close()
    assert torch.equal(out, reference)


def test_fp8_masters_are_made_one_tensor_at_a_time(monkeypatch):
    """Each original is quantized once and its fp8 copy dropped as soon as its master and scales are
    stored. On CUDA the fp8 copies are made on the GPU: keeping them all until the chunk that holds
    their scales came round cost the GPU the fp8 size of every swapped block (~6 GB at 14B)."""
    import lynx_core.offload.swapper as sw_mod

    model = make_model(31)
    swapper = attach_block_swap(model.blocks, 6, "cpu", borrowed=True, host_dtype="fp8_e4m3fn")
    swapper.close()
    fake = _FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr(sw_mod, "allocate_host", lambda nbytes, pin: torch.empty(nbytes, dtype=torch.uint8))
    made: list = []
    live_at_call: list[int] = []
    real = sw_mod.fp8_quantize

    def tracked(w, dtype):
        live_at_call.append(sum(r() is not None for r in made))
        q, s = real(w, dtype)
        made.append(weakref.ref(q))
        return q, s
    monkeypatch.setattr(sw_mod, "fp8_quantize", tracked)
    swapper._cuda = True  # the pinned packing path, against the fakes
    swapper.attach()
    assert swapper.pinned_bytes > 0 and len(swapper._chunks) > 1 and swapper.pageable_bytes == 0
    assert len(made) == sum(p.ndim == 2 for p in model.blocks.parameters())  # each quantized once
    assert max(live_at_call) <= 1, live_at_call
    for b in range(6):  # master and scales of one matrix sit side by side in one chunk
        for n, p in model.blocks[b].named_parameters():
            if p.ndim == 2:
                e = next(e for e in swapper._streams[b].entries if e.name == n)
                assert e.scale.data_ptr() - e.master.data_ptr() == align_up(p.numel(), ALIGN)
    swapper.close()


def test_pinning_failure_falls_back_to_pageable_masters(monkeypatch, caplog):
    import lynx_core.offload.swapper as sw_mod

    model = make_model(37)
    x, ctx, _ = inputs(38)
    t = torch.tensor([600])
    with torch.no_grad():
        reference = model(x, t, ctx)
    swapper = attach_block_swap(model.blocks, 4, "cpu", borrowed=True)
    swapper.close()
    fake = _FakeCuda()
    fake.install(monkeypatch)
    calls = {"n": 0}

    def refuse(nbytes, pin):
        calls["n"] += 1
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
    monkeypatch.setattr(sw_mod, "allocate_host", refuse)
    swapper._cuda = True
    with caplog.at_level(logging.WARNING, logger="lynx_core.offload.swapper"):
        swapper.attach()
    assert calls["n"] > 0 and swapper.pinned_bytes == 0 and swapper.pageable_bytes > 0
    assert "pageable" in caplog.text
    with torch.no_grad():
        out = model(x, t, ctx, block_fn=swapper.wrap(attention=model.attention))
    swapper.close()
    assert torch.equal(out, reference)


def _fake_device_tensors(monkeypatch, blocks) -> dict[int, int]:
    """Let the swapper take the current tensors of ``blocks`` for device (GPU) originals."""
    import lynx_core.offload.swapper as sw_mod

    on_device = {p.data_ptr() for b in blocks for p in b.parameters()}
    monkeypatch.setattr(sw_mod, "_is_host", lambda t: t.data_ptr() not in on_device)
    return on_device


@pytest.mark.parametrize("fail_in", ["_layout", "_ensure_ring"])
def test_failed_attach_puts_every_borrowed_weight_back(monkeypatch, fail_in):
    """ComfyUI's model must come out of a failed attach (out of memory, ...) as it went in: device
    originals kept until attach succeeds are simply pointed at again; after that they are copied back."""
    model = make_model(39)
    x, ctx, _ = inputs(40)
    t = torch.tensor([250])
    with torch.no_grad():
        reference = model(x, t, ctx)
    ptrs = {b: param_ptrs(model.blocks[b]) for b in range(6)}
    values = {n: p.detach().clone() for n, p in model.blocks.named_parameters()}
    on_device = _fake_device_tensors(monkeypatch, list(model.blocks))

    def boom(self, *a, **kw):
        raise torch.OutOfMemoryError(f"simulated failure in {fail_in}")
    monkeypatch.setattr(BlockSwapper, fail_in, boom)
    with pytest.raises(torch.OutOfMemoryError):
        attach_block_swap(model.blocks, 4, "cpu", borrowed=True, host_dtype="fp8_e4m3fn")
    for n, p in model.blocks.named_parameters():
        assert p.dtype == values[n].dtype and torch.equal(p, values[n]), n
    if fail_in == "_layout":  # before the originals were released: the very same tensors again
        assert all(param_ptrs(model.blocks[b]) == ptrs[b] for b in range(6))
    else:  # the originals were released for the ring: copied back from the exact host masters
        for b in choose_swapped(6, 4):
            assert all(p.data_ptr() not in on_device for p in model.blocks[b].parameters())
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), reference)
        with attach_block_swap(model.blocks, 4, "cpu", borrowed=True) as swapper:
            assert torch.equal(model(x, t, ctx, block_fn=swapper.wrap(attention=model.attention)), reference)


def test_failed_attach_of_an_owned_fp8_model_leaves_it_runnable(monkeypatch):
    model = make_model(41)
    x, ctx, _ = inputs(42)
    t = torch.tensor([150])
    with torch.no_grad():
        reference = model(x, t, ctx)
    dtypes = {n: p.dtype for n, p in model.blocks.named_parameters()}
    monkeypatch.setattr(BlockSwapper, "_ensure_ring",
                        lambda self: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    with pytest.raises(torch.OutOfMemoryError):
        BlockSwapper(model.blocks, plan_block_swap(model.blocks, 3, "cpu", host_dtype="fp8_e4m3fn"))
    assert {n: p.dtype for n, p in model.blocks.named_parameters()} == dtypes
    with torch.no_grad():
        out = model(x, t, ctx)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()  # fp8-rounded weights, as documented


class _Quantized(torch.Tensor):
    """Stands in for a GGUF tensor: a tensor subclass whose bytes are not the plain weight."""


def _with_quantized_weight(model, block: int):
    w = model.blocks[block].ffn[0].weight
    model.blocks[block].ffn[0].weight = torch.nn.Parameter(torch.Tensor._make_subclass(_Quantized, w.detach()),
                                                           requires_grad=False)
    return model


def test_quantized_tensor_subclasses_are_refused_or_left_to_their_loader(caplog):
    model = _with_quantized_weight(make_model(43), 2)
    with pytest.raises(BlockSwapError, match=r"blocks_to_swap=2: blocks\.2\.ffn\.0\.weight is a _Quantized.*GGUF"):
        plan_block_swap(model.blocks, 2, "cpu")
    with caplog.at_level(logging.WARNING, logger="lynx_core.offload.plan"):
        plan = plan_block_swap(model.blocks, "auto", "cpu", free_bytes=1, activation_bytes=0, reserve_bytes=0)
    assert plan.swapped == [] and plan.partial == [] and "streams nothing" in caplog.text
    assert plan_block_swap(model.blocks, 0, "cpu").swapped == []
    # a model its loader left on the host (ComfyUI lowvram): only plain blocks are streamed
    borrowed = plan_block_swap(model.blocks, 0, "meta", borrowed=True)
    assert borrowed.partial == [0, 1, 3, 4, 5]
    # the swapper refuses it too, if handed a plan made before the weight was replaced
    other = make_model(43)
    plan = plan_block_swap(other.blocks, 3, "cpu", placement="tail")
    _with_quantized_weight(other, 4)
    with pytest.raises(BlockSwapError, match="GGUF"):
        BlockSwapper(other.blocks, plan)


def test_activation_estimate_uses_the_weights_dtype():
    model = make_model(45).to(torch.bfloat16)
    for b in model.blocks:
        b.modulation.data = b.modulation.data.float()  # kept in fp32 by some checkpoints, listed first
    plan = plan_block_swap(model.blocks, 0, "cpu", tokens=96)
    expected = estimate_activation_bytes(96, CFG.dim, CFG.ffn_dim, torch.bfloat16)
    assert plan.activation_bytes == expected
    assert expected < estimate_activation_bytes(96, CFG.dim, CFG.ffn_dim, torch.float32)


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
    plan = plan_block_swap(model.blocks, 4, "cuda", host_dtype=torch.float8_e4m3fn if fp8 else None)
    expected = copy.deepcopy(model).cuda()
    if fp8:
        with torch.no_grad():
            for b in plan.swapped:  # only streamed blocks are stored as fp8; resident ones stay exact
                for p in expected.blocks[b].parameters():
                    if p.ndim == 2:
                        q, s = fp8_quantize(p)
                        p.copy_(fp8_dequantize(q, s, p.dtype))
    reference = euler_run(expected, x.cuda(), ctx.cuda())
    move_non_block_parts(model, "cuda")
    with BlockSwapper(model.blocks, plan, debug_timing=True) as swapper:
        out = euler_run(model, x.cuda(), ctx.cuda(), block_fn=swapper.wrap(attention=model.attention))
        assert swapper.pinned_bytes > 0
        for b in plan.swapped:
            assert all(p.device.type == "cpu" and p.is_pinned() for p in model.blocks[b].parameters())
        assert all(p.is_cuda for b in plan.resident for p in model.blocks[b].parameters())
    assert torch.equal(out, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_steady_state_streams_without_host_syncs(fp8):
    """After the first forward, running the blocks makes no host-device synchronisation (PyTorch's
    sync debug mode turns one into an error), and every block sees exactly its own weights while
    two ring slots are reused under real copy/compute concurrency."""
    model = make_model(47)
    plan = plan_block_swap(model.blocks, 4, "cuda", ring_size=2,
                           host_dtype=torch.float8_e4m3fn if fp8 else None)
    names = ("self_attn.q.weight", "ffn.0.weight", "ffn.0.bias", "modulation")
    want = {}
    for b, block in enumerate(model.blocks):
        params = dict(block.named_parameters())
        for n in names:
            w = params[n].detach().cuda()
            if fp8 and w.ndim == 2 and b in plan.swapped:  # resident blocks keep their weights
                w = fp8_dequantize(*fp8_quantize(w), w.dtype)
            want[b, n] = w
    seen = {}
    with BlockSwapper(model.blocks, plan) as swapper, torch.no_grad():
        def forward():
            for b in range(6):
                with swapper.use(b) as blk:
                    params = dict(blk.named_parameters())
                    for n in names:
                        seen[b, n] = params[n].detach().clone()
        forward()  # first loads
        torch.cuda.synchronize()
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                forward()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.synchronize()
        assert swapper.pinned_bytes > 0 and swapper.pageable_bytes == 0
    for key, w in want.items():
        assert torch.equal(seen[key], w), key
