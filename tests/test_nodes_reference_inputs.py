"""Lynx Encode Reference refuses VAEs other than Wan 2.1's, and a reference made from another face
than the sampler's ``face`` input is reported (no ComfyUI needed: stand-ins for its objects)."""
from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import torch

import nodes.guider as guider_mod
from lynx_core.adapters import LynxAdapters
from lynx_core.face.types import FaceIdentity
from lynx_core.wan.config import WAN_CONFIGS
from lynx_core.wan.model import WanModel
from nodes.payloads import AdaptersHandle, ReferenceFeatures, face_fingerprint, same_face
from nodes.reference import LynxEncodeReference, check_wan_vae, vae_compression, vae_posterior_sample
from nodes.sampling import build_guider, check_reference_face

CFG = WAN_CONFIGS["tiny"]
KW = dict(dim=CFG.dim, num_blocks=CFG.num_layers, resampler_dim=64, resampler_heads=1, resampler_dim_head=64,
          resampler_depth=1)


class _Patcher:
    def __init__(self, model):
        self.model = model
        self.replaced, self.wrappers = {}, {}

    def clone(self):
        return _Patcher(self.model)

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.replaced[(name, block_name, number)] = patch

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers[(wrapper_type, key)] = fn


class _StandInVAE:
    """ComfyUI's VAE as far as Lynx reads it: attributes as comfy.sd.VAE sets them, and encode()
    turning IMAGE [1, H, W, 3] into a latent through a final 1x1 conv ``conv1`` ([mean, logvar])."""

    def __init__(self, channels=16, spatial=8, temporal=4, video=True):
        self.latent_channels = channels
        if video:
            self.latent_dim = 3
            self.downscale_ratio = (lambda a: max(0, (a + 3) // temporal), spatial, spatial)
            self.downscale_index_formula = (temporal, spatial, spatial)
        else:
            self.latent_dim = 2
            self.downscale_ratio = spatial
        torch.manual_seed(5)
        self.first_stage_model = types.SimpleNamespace(conv1=torch.nn.Conv3d(3, 2 * channels, 1))
        self.channels, self.spatial, self.video, self.calls = channels, spatial, video, 0

    def encode(self, pixels):
        self.calls += 1
        x = pixels.movedim(-1, 1)[:, :, None]  # [1, 3, 1, H, W]
        x = torch.nn.functional.avg_pool3d(x, (1, self.spatial, self.spatial))
        with torch.no_grad():
            mean = self.first_stage_model.conv1(x)[:, : self.channels]
        return mean if self.video else mean[:, :, 0]


def _face(seed=0) -> FaceIdentity:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0)
    return FaceIdentity(embedding=emb, landmarks=np.zeros((1, 5, 2), np.float32),
                        crop112=np.zeros((1, 112, 112, 3), np.uint8), crop256=np.full((1, 256, 256, 3), 90, np.uint8),
                        faces_found=[1], chosen=[[0]], provider="cpu")


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return WanModel(CFG).eval()


def _user(wan) -> _Patcher:
    return _Patcher(types.SimpleNamespace(diffusion_model=wan))


def _handle(variant="full") -> AdaptersHandle:
    torch.manual_seed(1)
    return AdaptersHandle(adapters=LynxAdapters.create(variant, **KW).eval(), source=variant)


# ------------------------------------------------------------------ VAE
@pytest.mark.parametrize("vae,words", [
    (_StandInVAE(channels=4, temporal=1, video=False), "4 latent channels, 1x temporal compression"),
    (_StandInVAE(channels=48, spatial=16), "48 latent channels, 16x spatial compression"),
    (_StandInVAE(channels=16, temporal=8), "8x temporal compression"),
    (_StandInVAE(channels=16, temporal=1, video=False), "this VAE has 1x temporal compression"),  # Flux-like
])
def test_encode_reference_refuses_other_vaes_before_encoding(wan, vae, words):
    with pytest.raises(ValueError) as err:
        LynxEncodeReference().encode(_user(wan), vae, clip=object(), face=_face(), adapters=_handle("full"), seed=1)
    msg = str(err.value)
    assert msg.startswith("vae: ") and words in msg
    assert "wan_2.1_vae.safetensors" in msg and "16 latent channels, 8x spatial and 4x temporal" in msg
    assert vae.calls == 0, "nothing is encoded with the wrong VAE"
    if not vae.video:
        assert "image VAE" in msg
    if vae.latent_channels == 48:
        assert "Wan 2.2 VAE" in msg and "TI2V-5B" in msg


def test_the_wan_vae_passes_and_unknown_vaes_are_checked_by_their_latent():
    wan_vae = _StandInVAE()
    assert vae_compression(wan_vae) == (8, 4)
    check_wan_vae(wan_vae)
    px = torch.rand(1, 256, 256, 3)
    z = vae_posterior_sample(wan_vae, px, seed=3)
    assert z.shape == (1, 16, 1, 32, 32)
    # An object without ComfyUI's attributes is judged by what it encodes.
    plain = _StandInVAE(channels=4, video=False)
    del plain.latent_channels, plain.downscale_ratio, plain.latent_dim
    check_wan_vae(plain)
    with pytest.raises(ValueError, match=r"vae: this VAE encoded the 256x256 face into a latent of shape "
                                         r"\[1, 4, 32, 32\] instead of \[1, 16, 1, 32, 32\].*wan_2.1_vae"):
        vae_posterior_sample(plain, px, seed=3)
    with pytest.raises(ValueError, match="vae: connect the Wan 2.1 VAE"):
        check_wan_vae(None)


# ------------------------------------------------------------------ reference from another face
def test_reference_remembers_its_face_and_mismatch_is_reported(caplog):
    a, b = _face(0).embedding, _face(1).embedding
    ref = ReferenceFeatures(cond={}, uncond={}, dim=8, num_blocks=1, seed=0, face_embedding=a.clone())
    assert ref.face_fingerprint == face_fingerprint(a) != face_fingerprint(b)
    assert face_fingerprint(a) in repr(ref)
    assert same_face(a, a + 1e-4 * torch.randn(512)), "backend noise is the same face"
    with caplog.at_level(logging.WARNING):
        assert check_reference_face(ref, a)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert not check_reference_face(ref, b)
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert msg.startswith("reference: it was made from another face") and face_fingerprint(a) in msg
    assert face_fingerprint(b) in msg and "same Lynx Encode Face ID output" in msg
    # References made before the payload carried a face cannot be compared: no warning.
    old = ReferenceFeatures(cond={}, uncond={}, dim=8, num_blocks=1, seed=0)
    assert old.face_embedding is None and check_reference_face(old, b) and old.face_fingerprint == "none"


@pytest.fixture()
def comfy_stub(monkeypatch):
    class _GuiderBase:
        def __init__(self, model_patcher):
            self.model_patcher, self.conds = model_patcher, {}

        def set_conds(self, positive, negative):
            self.conds = {"positive": positive, "negative": negative}

    samplers = types.SimpleNamespace(CFGGuider=_GuiderBase)
    ext = types.SimpleNamespace(WrappersMP=types.SimpleNamespace(DIFFUSION_MODEL="diffusion_model"))
    comfy = types.ModuleType("comfy")
    comfy.samplers, comfy.patcher_extension = samplers, ext
    for name, mod in (("comfy", comfy), ("comfy.samplers", samplers), ("comfy.patcher_extension", ext)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(guider_mod, "_CLASS", None)
    yield
    guider_mod._CLASS = None


@pytest.mark.parametrize("same", [True, False])
def test_sampler_warns_when_reference_and_face_differ(comfy_stub, wan, caplog, same):
    torch.manual_seed(2)
    feats = [{i: torch.randn(1, 8, CFG.dim) for i in range(CFG.num_layers)} for _ in range(2)]
    ref = ReferenceFeatures(cond=feats[0], uncond=feats[1], dim=CFG.dim, num_blocks=CFG.num_layers, seed=42,
                            face_embedding=_face(0).embedding)
    face = _face(0 if same else 1)
    with caplog.at_level(logging.WARNING):
        g = build_guider(_user(wan), _handle("full"), face, [{}], [{}], 5.0, 2.0, 1.0, 1.0, 0.0, 1.0, 0, reference=ref)
    assert g.state.patch is not None and g.state.patch.has_reference
    warned = [r for r in caplog.records if "made from another face" in r.getMessage()]
    assert len(warned) == (0 if same else 1)
