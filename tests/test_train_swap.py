"""Training memory runners: per-block checkpointing, block swap with autograd, activation offload.

All on the CPU in fp32 with lynx_core's tiny Wan DiT and tiny Lynx-full adapters. The swapper's
copies are synchronous there, but the ring, pointer switching, host masters, fp8 storage and the
recompute Function run the same code as on CUDA. Gradients are compared bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lynx_core.adapters.lynx_adapters import LynxAdapters
from lynx_core.attention import attention_sdpa
from lynx_core.block import BlockAdapterInputs, wan_block_forward
from lynx_core.offload import BlockSwapError, BlockSwapper, fp8_dequantize, fp8_quantize, plan_block_swap
from lynx_core.offload.plan import block_tensors
from lynx_core.reference import extract_reference_features
from lynx_core.train.runner import ActivationOffload, CheckpointRunner, plain_runner
from lynx_core.train.swap import SwapRunner
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from lynx_core.wan.rope import apply_rope

CFG = WAN_CONFIGS["tiny"].with_(num_layers=6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # One thread for the whole module: the module-scoped reference gradients and every test must
    # use the same reduction order to compare bit for bit.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    model = WanModel(CFG).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():  # default init leaves biases/norms trivial; make every tensor matter
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.requires_grad_(False)
    adapters = LynxAdapters.create("full", dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=32,
                                   resampler_heads=2, resampler_dim_head=16, resampler_depth=1)
    return model, adapters


def make_batch(seed: int = 1, grid=(2, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    return dict(
        latent=torch.randn(1, 16, f, 2 * h, 2 * w, generator=g),
        target=torch.randn(1, 16, f, 2 * h, 2 * w, generator=g),
        text=torch.randn(1, 7, CFG.text_dim, generator=g),
        ref_latent=torch.randn(1, 16, 1, 8, 8, generator=g),
        ref_text=torch.randn(1, 5, CFG.text_dim, generator=g),
        face=torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1),
        t=torch.tensor([600.0]),
    )


def block_step(block, x, e, freqs, ctx, k_ip, v_ip, k_ref, v_ref):
    # The key norms are the block's own weights: applied inside the step, where a swapped block's
    # weights are on the device.
    ad = BlockAdapterInputs(ip=(block.cross_attn.norm_k(k_ip), v_ip), ref=(block.self_attn.norm_k(k_ref), v_ref))
    return wan_block_forward(block, x, e, freqs, ctx, rope=apply_rope, attention=attention_sdpa, adapters=ad)


def train_step(model, adapters, runner, batch, *, ref_runner=None, x_requires_grad=True):
    """One loss.backward() through every block; returns (loss, output tokens, gradients by name)."""
    adapters.zero_grad(set_to_none=True)
    feats = extract_reference_features(model, batch["ref_latent"], batch["ref_text"], block_runner=ref_runner)
    id_tokens = adapters.encode_identity(batch["face"])
    tokens, grid, e, temb, ctx, freqs = model.embed(batch["latent"], batch["t"], batch["text"])
    x = tokens.detach().clone().requires_grad_(x_requires_grad)
    h = x
    for i, block in enumerate(model.blocks):
        ip, ref = adapters.ip_layer(i), adapters.ref_layer(i)
        toks = ip.tokens_with_registers(id_tokens)
        k_ip, v_ip = ip.to_k_ip(toks), ip.to_v_ip(toks)
        k_ref, v_ref = ref.to_k_ref(feats[i]), ref.to_v_ref(feats[i])
        h = runner(i, block, block_step, h, e, freqs, ctx, k_ip, v_ip, k_ref, v_ref)
    out = model.unpatchify(model.head(h, temb), grid)
    loss = (out - batch["target"]).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in adapters.named_parameters() if p.grad is not None}
    if x_requires_grad:
        grads["x"] = x.grad.clone()
    return loss.detach(), h.detach(), grads


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), f"gradient of {k} differs: max {float((a[k] - b[k]).abs().max())}"


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference():
    model, adapters = make_models()
    batch = make_batch()
    return train_step(model, adapters, plain_runner, batch)


# ------------------------------------------------------------------------------------------------
# checkpointing
# ------------------------------------------------------------------------------------------------

def test_checkpoint_runner_gives_plain_gradients_bit_for_bit(reference):
    model, adapters = make_models()
    loss, out, grads = train_step(model, adapters, CheckpointRunner(), make_batch())
    assert torch.equal(loss, reference[0]) and torch.equal(out, reference[1])
    assert_same(grads, reference[2])
    assert all(p.grad is None for p in model.parameters())


def test_checkpoint_keeps_less_than_plain():
    """What autograd holds after forward: the checkpoint keeps only block inputs."""
    model, adapters = make_models()
    batch = make_batch(grid=(2, 8, 8))

    def saved_bytes(runner) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tokens, _g, e, _temb, ctx, freqs = model.embed(batch["latent"], batch["t"], batch["text"])
            h = tokens.detach().requires_grad_(True)
            kv = [torch.randn(1, n, CFG.dim, requires_grad=True) for n in (32, 32, 16, 16)]
            for i, block in enumerate(model.blocks):
                h = runner(i, block, block_step, h, e, freqs, ctx, *kv)
        return total
    plain, ckpt = saved_bytes(plain_runner), saved_bytes(CheckpointRunner(ActivationOffload(min_bytes=0)))
    assert ckpt * 5 < plain, (ckpt, plain)


# ------------------------------------------------------------------------------------------------
# block swap
# ------------------------------------------------------------------------------------------------

def test_swapped_training_gives_resident_gradients_bit_for_bit(reference):
    model, adapters = make_models()
    before = snapshot(model)
    with SwapRunner.attach(model.blocks, 3, "cpu") as runner:
        assert runner.swapped and len(runner.swapped) == 3
        loss, out, grads = train_step(model, adapters, runner, make_batch(), ref_runner=runner.forward_runner(model))
        # a second step through the same ring (blocks now held in other slots) gives the same again
        loss2, _out2, grads2 = train_step(model, adapters, runner, make_batch(),
                                          ref_runner=runner.forward_runner(model))
    assert torch.equal(loss, reference[0]) and torch.equal(out, reference[1])
    assert_same(grads, reference[2])
    assert_same(grads2, reference[2])
    assert all(p.grad is None for p in model.parameters()), "the frozen base received gradients"
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the base changed"


def test_all_blocks_swapped_and_block_zero_input_without_grad():
    model, adapters = make_models()
    ref = train_step(copy.deepcopy(model), copy.deepcopy(adapters), plain_runner, make_batch(), x_requires_grad=False)
    with SwapRunner.attach(model.blocks, CFG.num_layers, "cpu", ring_size=2) as runner:
        got = train_step(model, adapters, runner, make_batch(), x_requires_grad=False)
    assert_same(got[2], ref[2])


def test_reference_pass_through_the_swapper_equals_resident():
    model, _adapters = make_models()
    batch = make_batch()
    want = extract_reference_features(model, batch["ref_latent"], batch["ref_text"])
    with SwapRunner.attach(model.blocks, 4, "cpu") as runner:
        got = extract_reference_features(model, batch["ref_latent"], batch["ref_text"],
                                         block_runner=runner.forward_runner(model))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[i], want[i]) for i in want)


def test_prefetch_follows_backward_order():
    """3 swapped blocks, a 2-slot ring: the first step loads 4 blocks, later steps 2. The inference
    order (wrap to block 0 after the forward) would reload the last blocks in backward."""
    model, adapters = make_models()
    plan = plan_block_swap(model.blocks, 3, "cpu", placement="tail", ring_size=2)
    swapper = BlockSwapper(model.blocks, plan, debug_timing=True)
    runner = SwapRunner(swapper)
    batch = make_batch()
    feats = extract_reference_features(model, batch["ref_latent"], batch["ref_text"])  # resident, no loads

    def step():
        swapper.reset_timings()
        before = swapper.loads
        tokens, _grid, e, temb, ctx, freqs = model.embed(batch["latent"], batch["t"], batch["text"])
        h = tokens.detach().requires_grad_(True)
        ids = adapters.encode_identity(batch["face"])
        for i, block in enumerate(model.blocks):
            ip, ref = adapters.ip_layer(i), adapters.ref_layer(i)
            toks = ip.tokens_with_registers(ids)
            h = runner(i, block, block_step, h, e, freqs, ctx, ip.to_k_ip(toks), ip.to_v_ip(toks),
                       ref.to_k_ref(feats[i]), ref.to_v_ref(feats[i]))
        h.pow(2).mean().backward()
        return swapper.loads - before, {t.block: t.loads for t in swapper.timings() if t.loads}

    try:
        first, per_block = step()
        assert first == 4 and per_block == {3: 2, 4: 1, 5: 1}, per_block
        second, per_block = step()
        assert second == 2 and per_block == {5: 1, 3: 1}, per_block
    finally:
        swapper.close()


class Boom(RuntimeError):
    pass


def test_interrupt_in_forward_or_backward_leaves_the_model_usable(reference):
    model, adapters = make_models()
    before = snapshot(model)
    runner = SwapRunner.attach(model.blocks, 3, "cpu")
    swapped = runner.swapped
    target = swapped[1]
    when = {"phase": None}

    def failing(block, *tensors):
        in_backward = torch.is_grad_enabled()
        if when["phase"] == ("backward" if in_backward else "forward") and block is model.blocks[target]:
            raise Boom(when["phase"])
        return block_step(block, *tensors)

    def step():
        feats = extract_reference_features(model, make_batch()["ref_latent"], make_batch()["ref_text"],
                                           block_runner=runner.forward_runner(model))
        batch = make_batch()
        tokens, grid, e, temb, ctx, freqs = model.embed(batch["latent"], batch["t"], batch["text"])
        h = tokens.detach().requires_grad_(True)
        ids = adapters.encode_identity(batch["face"])
        for i, block in enumerate(model.blocks):
            ip, ref = adapters.ip_layer(i), adapters.ref_layer(i)
            toks = ip.tokens_with_registers(ids)
            h = runner(i, block, failing, h, e, freqs, ctx, ip.to_k_ip(toks), ip.to_v_ip(toks),
                       ref.to_k_ref(feats[i]), ref.to_v_ref(feats[i]))
        h.pow(2).mean().backward()

    def weights_at_rest() -> bool:
        for b in swapped:
            masters = runner.swapper.masters(b)
            for name, t in block_tensors(model.blocks[b]):
                if t.data_ptr() != masters[name].data_ptr():
                    return False
        return True

    try:
        for phase in ("forward", "backward"):
            when["phase"] = phase
            with pytest.raises(Boom):
                step()
            assert weights_at_rest(), f"an exception in {phase} left weights in the ring"
            assert not any(s.in_use for s in runner.swapper._slots)
        # still usable: a clean step gives the reference gradients
        _loss, _out, grads = train_step(model, adapters, runner, make_batch(), ref_runner=runner.forward_runner(model))
        assert_same(grads, reference[2])
    finally:
        runner.close()
        runner.close()  # twice is fine
    assert not runner.swapper.ring_allocated
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fp8_base_equals_resident_training_on_fp8_rounded_weights():
    model, adapters = make_models()
    ref_model, ref_adapters = copy.deepcopy(model), copy.deepcopy(adapters)
    runner = SwapRunner.attach(model.blocks, 2, "cpu", fp8_base=True)
    try:
        assert runner.swapper.plan.host_dtype == torch.float8_e4m3fn
        with torch.no_grad():
            for b in runner.swapped:  # the weights a swapped block computes with
                for name, t in block_tensors(ref_model.blocks[b]):
                    if t.ndim == 2:
                        t.copy_(fp8_dequantize(*fp8_quantize(t), t.dtype))
                masters = runner.swapper.masters(b)
                assert any(m.dtype == torch.float8_e4m3fn for m in masters.values())
        got = train_step(model, adapters, runner, make_batch(), ref_runner=runner.forward_runner(model))
    finally:
        runner.close()
    want = train_step(ref_model, ref_adapters, CheckpointRunner(), make_batch())
    assert_same(got[2], want[2])


def test_activation_offload_keeps_gradients_and_parks_block_inputs(reference):
    model, adapters = make_models()
    off = ActivationOffload(min_bytes=0)
    got = train_step(model, adapters, CheckpointRunner(off), make_batch())
    assert_same(got[2], reference[2])
    # per block: hidden state + 4 adapter keys/values, nothing shared (e, freqs, ctx need no grad)
    assert off.packed == 5 * CFG.num_layers
    assert off._live_bytes == 0 and off.peak_host_bytes > 0

    model, adapters = make_models()
    off = ActivationOffload(min_bytes=0)
    with SwapRunner.attach(model.blocks, 3, "cpu", offload_activations=off) as runner:
        got = train_step(model, adapters, runner, make_batch(), ref_runner=runner.forward_runner(model))
    assert_same(got[2], reference[2])
    assert off.packed == 5 * CFG.num_layers


def test_trainable_base_is_refused():
    model, _adapters = make_models()
    model.blocks[2].ffn[0].weight.requires_grad_(True)
    with pytest.raises(BlockSwapError, match=r"blocks\.2\.ffn\.0\.weight.*requires_grad_\(False\)"):
        SwapRunner.attach(model.blocks, 2, "cpu")


def test_runner_refuses_a_foreign_block():
    model, _adapters = make_models()
    other, _ = make_models(seed=3)
    with SwapRunner.attach(model.blocks, 2, "cpu") as runner:
        with pytest.raises(BlockSwapError, match="same block list"):
            runner(0, other.blocks[0], block_step, torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_swapped_training_matches_resident():
    """On CUDA the copies run on their own stream and backward in autograd's device thread."""
    model, adapters = make_models()
    model, adapters = model.cuda(), adapters.cuda()
    batch = {k: v.cuda() for k, v in make_batch().items()}
    want = train_step(copy.deepcopy(model), copy.deepcopy(adapters), CheckpointRunner(), batch)
    with SwapRunner.attach(model.blocks, 3, "cuda", offload_activations=ActivationOffload(min_bytes=0)) as runner:
        got = train_step(model, adapters, runner, batch, ref_runner=runner.forward_runner(model))
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-5, atol=1e-7)
