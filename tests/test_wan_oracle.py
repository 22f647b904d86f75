"""Our reference DiT against diffusers' independent WanTransformer3DModel (test-only oracle)."""
import pytest
import torch

from lynx_core.wan.checkpoint import (diffusers_to_original, load_wan, normalize_state_dict,
                                      original_to_diffusers, save_wan, infer_config)
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra (pip install .[test])")


def _oracle(cfg):
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps).eval()


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = WAN_CONFIGS["tiny"]
    ours = WanModel(cfg).eval()
    _randomize(ours, 1)
    oracle = _oracle(cfg)
    missing, unexpected = oracle.load_state_dict(original_to_diffusers(ours.state_dict()), strict=True)
    return ours, oracle


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("grid", [(1, 8, 8), (3, 6, 10)])
def test_forward_matches_diffusers(pair, grid):
    ours, oracle = pair
    g = torch.Generator().manual_seed(3)
    f, h, w = grid
    x = torch.randn(2, 16, f, h * 2, w * 2, generator=g)
    t = torch.tensor([999, 57])
    ctx = torch.randn(2, 12, ours.config.text_dim, generator=g)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = oracle(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert a.shape == b.shape == x.shape
    assert _rel(a, b) <= 1e-5


def test_key_maps_are_inverse_and_cover_every_key(pair):
    ours, oracle = pair
    sd = ours.state_dict()
    diff = original_to_diffusers(sd)
    assert set(diff) == set(oracle.state_dict())
    assert set(diffusers_to_original(diff)) == set(sd)


def test_checkpoint_roundtrip_in_all_namings(tmp_path, pair):
    ours, _ = pair
    x = torch.randn(1, 16, 1, 4, 4)
    t = torch.tensor([500])
    ctx = torch.randn(1, 5, ours.config.text_dim)
    with torch.no_grad():
        ref = ours(x, t, ctx)
    for name, kw in {"orig": {}, "diffusers": {"diffusers_names": True},
                     "comfy": {"prefix": "model.diffusion_model."}}.items():
        path = save_wan(ours, tmp_path / f"{name}.safetensors", **kw)
        loaded = load_wan(path)
        assert loaded.config == ours.config
        got = loaded.state_dict()
        assert set(got) == set(ours.state_dict())
        assert all(torch.equal(got[k], v) for k, v in ours.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t, ctx), ref, rtol=1e-5, atol=1e-5)


def test_config_inference_from_shapes():
    with torch.device("meta"):
        for name in ("1.3B", "14B"):
            cfg = WAN_CONFIGS[name]
            sd = WanModel(cfg).state_dict()
            assert infer_config(normalize_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()})) == cfg


def test_rejects_pickle_checkpoint(tmp_path):
    p = tmp_path / "wan.ckpt"
    p.write_bytes(b"not really")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_wan(p)
