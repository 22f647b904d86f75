"""Training data: dataset folder -> safetensors cache -> samples (real photos, MTCNN, random ArcFace).

One module-level build covers the normal path; the error cases use small datasets of their own.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lynx_core.face import FaceAnalyzer
from lynx_core.train.cache import CacheError, CacheSettings, DataEncoders, TrainCache, _split_heldout, build_cache
from lynx_core.train.dataset import DatasetError, scan_dataset
from lynx_core.train.media import MediaError, resize_center_crop
from lynx_core.train.tiny_encoders import TinyTextEncoder, TinyVAE
from lynx_core.train.types import TrainSample
from lynx_core.video import write_video
from tests.conftest_face import astronaut, camera_rgb, cat, models_root_with_arcface

RES = [[256, 256], [256, 384]]


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path)
    return path


def _caption(path: Path, text: str) -> None:
    path.with_suffix(".txt").write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("mtcnn", models_dirs=[models_root_with_arcface()], device="cpu")


@pytest.fixture(scope="module")
def vae() -> TinyVAE:
    return TinyVAE(seed=0)


def _encoders(analyzer, vae=None, vae_id="tiny-vae", text=None) -> DataEncoders:
    vae = vae or TinyVAE(0)
    text = text or TinyTextEncoder(dim=32)
    return DataEncoders(vae, text, analyzer, vae_id=vae_id, text_encoder_id=text.identifier, face_id="mtcnn+random")


def _flipped() -> np.ndarray:
    return np.ascontiguousarray(astronaut()[:, ::-1])


def _clip() -> np.ndarray:
    """11 frames of the mirrored astronaut drifting sideways, 256x256 (same person, not a copy)."""
    base = resize_center_crop(_flipped()[None], 256, 256)[0]
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(11)])


def _face256() -> np.ndarray:
    return resize_center_crop(astronaut()[None], 256, 256)[0]


def _coffee() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.coffee())


def _make_main_dataset(root: Path) -> Path:
    _png(root / "anna" / "id" / "front.png", _face256())
    _png(root / "anna" / "id" / "cat.png", cat())                                      # no face: its pairs drop
    _caption(_png(root / "anna" / "still.png", _face256()), "the same photo again")   # copy-paste risk
    _caption(_png(root / "anna" / "man.png", camera_rgb()), "a man with a camera")    # another person
    _caption(_png(root / "anna" / "coffee.png", _coffee()), "a cup of coffee")        # no face in the target
    clip = root / "anna" / "clips" / "clip.mp4"
    clip.parent.mkdir(parents=True)
    write_video(_clip(), clip, fps=8, crf=10)
    _caption(clip, "A woman, mirrored, turns her head.")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, analyzer):
    root = _make_main_dataset(tmp_path_factory.mktemp("dataset"))
    cache_dir = tmp_path_factory.mktemp("cache")
    # Random ArcFace weights make every face look alike, so the threshold is put between the clip
    # (same person) and the cameraman (another person) as measured by a first, accept-all build.
    loose = build_cache(root, cache_dir, _encoders(analyzer),
                        CacheSettings(resolutions=RES, max_frames=9, verify_threshold=-1.0))
    sims = {e.target: e.similarity for e in loose.entries}
    same, other = sims["anna/clips/clip.mp4"], sims["anna/man.png"]
    assert other < same
    settings = CacheSettings(resolutions=RES, max_frames=9, verify_threshold=(same + other) / 2)
    cache = build_cache(root, cache_dir, _encoders(analyzer), settings)
    return root, cache_dir, settings, cache, (same, other)


def test_new_threshold_reencodes_nothing_and_says_why(built):
    cache = built[3]
    assert sum(cache.stats["encoded"].values()) == 0
    assert any(r.startswith("setting verify_threshold changed: -1.0 ->") for r in cache.rebuild_reasons)


def test_pairs_kept_and_dropped_with_reasons(built):
    root, _, settings, cache, (same, other) = built
    keys = sorted(e.key for e in cache.entries)
    assert keys == ["anna/clips/clip.mp4#anna/id/front.png", "anna/still.png#anna/id/front.png"]
    dropped: dict[str, list[str]] = {}
    for f, r in cache.dropped:
        dropped.setdefault(f, []).append(r)
    # every target's pair with the cat photo is dropped for the photo; the cameraman fails verification
    assert all(any("anna/id/cat.png has no detectable face" in r for r in dropped[t])
               for t in ("anna/still.png", "anna/man.png", "anna/coffee.png", "anna/clips/clip.mp4"))
    assert any(f"ArcFace similarity {other:.3f}" in r and "verify_threshold" in r for r in dropped["anna/man.png"])
    assert any("no face found in its first/middle frame" in r for r in dropped["anna/coffee.png"])
    assert any("no face found in identity photo anna/id/cat.png" in w for w in cache.warnings)
    clip = next(e for e in cache.entries if e.target == "anna/clips/clip.mp4")
    assert clip.similarity == same and same > settings.verify_threshold


def test_copy_paste_is_warned(built):
    cache = built[3]
    warned = [w for w in cache.warnings if "anna/still.png" in w]
    assert any("same pixels" in w for w in warned) and any("copy-paste" in w for w in warned)
    assert not any("anna/clips/clip.mp4" in w for w in cache.warnings)


def test_samples_buckets_and_fixed_embeddings(built, vae):
    root, _, _, cache, _ = built
    by_target = {e.target: i for i, e in enumerate(cache.entries)}
    clip = cache.entries[by_target["anna/clips/clip.mp4"]]
    assert clip.bucket == (3, 32, 32) and clip.tokens == 3 * 16 * 16  # 11 frames -> 9 -> 3 latent frames
    still = cache.entries[by_target["anna/still.png"]]
    assert still.bucket == (1, 32, 32)  # square photo -> the square bucket
    s = cache.sample(by_target["anna/still.png"])
    assert isinstance(s, TrainSample) and s.key == still.key
    torch.testing.assert_close(s.latent, vae(_face256()[None]))
    caption = "the same photo again"
    assert s.text.shape == (len(caption.split()) + 1, 32)
    torch.testing.assert_close(s.text, TinyTextEncoder(32)(caption))
    assert s.face_embedding.shape == (512,)
    assert float(torch.linalg.vector_norm(s.face_embedding)) == pytest.approx(1.0, abs=1e-5)
    assert s.ref_latent.shape == (16, 1, 32, 32)
    torch.testing.assert_close(s.ref_latent, vae(cache.reference_crop(by_target["anna/still.png"])[None]))
    v = cache.sample(by_target["anna/clips/clip.mp4"])
    # the first 9 of the 11 written frames, through a lossy mp4
    torch.testing.assert_close(v.latent, vae(_clip()[:9]), atol=0.05, rtol=0)
    assert not torch.allclose(v.latent, vae(_clip()[2:11]), atol=0.05, rtol=0)
    fixed = cache.fixed
    torch.testing.assert_close(fixed.grey_ref_latent, vae(np.full((1, 256, 256, 3), 127, np.uint8)))
    assert fixed.empty_text.shape == (1, 32) and fixed.reference_text.shape == (5, 32)  # "image of a face" + end
    assert "bucket" in cache.describe() and cache.fingerprint == TrainCache.open(built[1]).fingerprint


def test_cache_is_safetensors_and_json_only(built):
    from safetensors import safe_open

    cache_dir = built[1]
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    for p in files:
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt"):
                pass
    assert json.loads((cache_dir / "manifest.json").read_text())["fingerprint"] == built[3].fingerprint
    reopened = TrainCache.open(cache_dir)
    torch.testing.assert_close(reopened.sample(0).latent, built[3].sample(0).latent)


def test_rebuild_reuses_and_reencodes_only_what_changed(built, analyzer, tmp_path):
    root0, cache0, settings, first, _ = built
    root, cache_dir = tmp_path / "ds", tmp_path / "cache"
    shutil.copytree(root0, root, copy_function=shutil.copy2)  # copy2 keeps mtimes: same stat fingerprints
    shutil.copytree(cache0, cache_dir)
    enc = _encoders(analyzer)
    # moved folder, same content: the shards are reused, only the index is rewritten
    again = build_cache(root, cache_dir, enc, settings)
    assert sum(again.stats["encoded"].values()) == 0 and again.stats["reused"]["latents"] == 4
    assert any(r.startswith("dataset folder changed") for r in again.rebuild_reasons)
    # a new caption re-encodes one text shard and says so
    _caption(root / "anna" / "still.png", "a mirrored astronaut")
    recap = build_cache(root, cache_dir, enc, settings)
    assert recap.stats["encoded"] == {"latents": 0, "texts": 1, "target_faces": 0, "faces": 0, "refs": 0, "fixed": 0}
    assert any("changed caption" in r and "anna/still.png" in r for r in recap.rebuild_reasons)
    assert recap.fingerprint != first.fingerprint
    # a setting that changes the clips re-encodes the latents and names the setting; stale shards go
    shorter = CacheSettings(**{**settings.__dict__, "max_frames": 5})
    short = build_cache(root, cache_dir, enc, shorter)
    assert any("max_frames changed: 9 -> 5" in r for r in short.rebuild_reasons)
    assert short.stats["encoded"]["latents"] == 4 and short.stats["encoded"]["faces"] == 0
    assert short.stats["encoded"]["target_faces"] == 1  # only the clip's middle frame moved
    assert next(e for e in short.entries if e.target == "anna/clips/clip.mp4").bucket == (2, 32, 32)
    assert len(list((cache_dir / "latents").glob("*.safetensors"))) == 4  # the 9-frame ones are gone
    # another VAE: what depends on it is re-encoded and the reason names it; no face is re-detected
    other = build_cache(root, cache_dir, _encoders(analyzer, TinyVAE(1), vae_id="tiny-vae-1"), shorter)
    assert any(r.startswith("vae changed: 'tiny-vae' -> 'tiny-vae-1'") for r in other.rebuild_reasons)
    assert other.stats["encoded"]["fixed"] == 1 and other.stats["encoded"]["refs"] == 1
    assert other.stats["encoded"]["latents"] == 4
    assert other.stats["encoded"]["faces"] == 0 and other.stats["encoded"]["target_faces"] == 0
    # the held-out split is only an index change; a dropped target in heldout_list is warned about
    split = build_cache(root, cache_dir, _encoders(analyzer, TinyVAE(1), vae_id="tiny-vae-1"),
                        CacheSettings(**{**shorter.__dict__, "heldout_list": ["anna/still.png", "anna/man.png"]}))
    assert sum(split.stats["encoded"].values()) == 0
    assert [e.target for e in split.entries if e.heldout] == ["anna/still.png"]
    assert split.indices(heldout=False) == [i for i, e in enumerate(split.entries) if e.target != "anna/still.png"]
    assert any("heldout_list names anna/man.png, whose pairs were all dropped" in w for w in split.warnings)


def test_interrupted_build_leaves_no_partial_files_and_resumes(analyzer, tmp_path):
    root = tmp_path / "ds"
    for name in ("a", "b", "c"):
        _caption(_png(root / "p" / f"{name}.png", astronaut()[::2, ::2]), f"photo {name}")
    _png(root / "p" / "id" / "face.png", astronaut())
    calls = {"n": 0}
    good = TinyVAE(0)

    def flaky(frames):
        calls["n"] += 1
        if calls["n"] == 4:  # fixed grey, face crop, first target: then the second target fails
            raise KeyboardInterrupt
        return good(frames)

    settings = CacheSettings(resolutions=RES, max_frames=1, verify_threshold=None)
    cache_dir = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache(root, cache_dir, _encoders(analyzer, flaky), settings)
    assert not (cache_dir / "manifest.json").exists()
    assert not [p for p in cache_dir.rglob("*.tmp")]
    cache = build_cache(root, cache_dir, _encoders(analyzer, good), settings)
    assert cache.stats["reused"]["latents"] == 1 and cache.stats["encoded"]["latents"] == 2
    assert len(cache) == 3


def test_no_face_in_any_identity_photo(analyzer, tmp_path):
    root = tmp_path / "ds"
    _png(root / "bob" / "id" / "cat.png", cat())
    _caption(_png(root / "bob" / "x.png", astronaut()), "x")
    with pytest.raises(CacheError, match=r"no face found in any of the 1 identity photo\(s\) \(bob/id/cat.png\)"):
        build_cache(root, tmp_path / "cache", _encoders(analyzer), CacheSettings(resolutions=RES, max_frames=1))


def test_unreadable_target_is_named(analyzer, tmp_path):
    root = tmp_path / "ds"
    _png(root / "p" / "id" / "face.png", astronaut())
    bad = root / "p" / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    _caption(bad, "broken")
    with pytest.raises(MediaError, match=r"broken\.mp4.*Re-encode it"):
        build_cache(root, tmp_path / "cache", _encoders(analyzer), CacheSettings(resolutions=RES, max_frames=1))


def test_encoder_with_wrong_shape_is_named(analyzer, tmp_path):
    root = tmp_path / "ds"
    _png(root / "p" / "id" / "face.png", astronaut())
    _caption(_png(root / "p" / "a.png", astronaut()), "a")
    enc = DataEncoders(lambda f: torch.zeros(16, 1, 4, 4), TinyTextEncoder(32), analyzer, "bad", "t")
    with pytest.raises(CacheError, match=r"encode_video returned shape \(16, 1, 4, 4\) for the grey image"):
        build_cache(root, tmp_path / "cache", enc, CacheSettings(resolutions=RES, max_frames=1))


# -- dataset scanning (no face models needed) -------------------------------------------------------
def test_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="is empty: no targets found"):
        scan_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_person_without_identity_photos(tmp_path):
    _caption(_png(tmp_path / "anna" / "a.png", cat()), "a")
    _caption(_png(tmp_path / "bob" / "b.png", cat()), "b")
    _png(tmp_path / "bob" / "id" / "face.png", cat())
    with pytest.raises(DatasetError, match=r"1 person folder\(s\).*no identity photos: anna\. .*anna/id/front\.jpg"):
        scan_dataset(tmp_path)


def test_missing_captions_are_listed(tmp_path):
    _png(tmp_path / "anna" / "id" / "face.png", cat())
    _png(tmp_path / "anna" / "a.png", cat())
    _png(tmp_path / "anna" / "b.png", cat())
    _caption(_png(tmp_path / "anna" / "c.png", cat()), "  has one \n")
    with pytest.raises(DatasetError, match=r"2 target\(s\) have no caption: anna/a\.png, anna/b\.png.*allow_empty_captions"):
        scan_dataset(tmp_path)
    scan = scan_dataset(tmp_path, allow_empty_captions=True)
    assert {t.path: t.caption for t in scan.targets} == {"anna/a.png": "", "anna/b.png": "", "anna/c.png": "has one"}
    assert scan.pairs == [(t, "anna/id/face.png") for t in scan.targets]


def test_metadata_jsonl_pairs_and_errors(tmp_path):
    _png(tmp_path / "anna" / "id1.jpg", cat())
    _png(tmp_path / "anna" / "id2.jpg", cat())
    _caption(_png(tmp_path / "anna" / "t.png", cat()), "from txt")
    _png(tmp_path / "anna" / "u.png", cat())
    meta = tmp_path / "metadata.jsonl"
    meta.write_text(json.dumps({"target": "anna/t.png", "identity": ["anna/id1.jpg", "anna/id2.jpg"]}) + "\n\n"
                    + json.dumps({"target": "anna/u.png", "identity": "anna/id1.jpg", "caption": "given",
                                  "heldout": True}) + "\n")
    scan = scan_dataset(tmp_path)
    assert scan.source == "metadata.jsonl"
    assert [(t.path, t.caption, t.identities, t.heldout) for t in scan.targets] == [
        ("anna/t.png", "from txt", ("anna/id1.jpg", "anna/id2.jpg"), None),
        ("anna/u.png", "given", ("anna/id1.jpg",), True)]
    assert len(scan.pairs) == 3
    for line, pattern in [
        ({"target": "anna/t.png", "identity": "anna/id1.jpg", "captoin": "x"}, r"line 1: unknown field\(s\) \['captoin'\]"),
        ({"target": "anna/nope.png", "identity": "anna/id1.jpg"}, r"line 1: target 'anna/nope.png' does not exist"),
        ({"target": "anna/t.png"}, r"line 1: \"identity\" is missing"),
        ({"target": "../t.png", "identity": "anna/id1.jpg"}, r"stay inside it"),
    ]:
        meta.write_text(json.dumps(line) + "\n")
        with pytest.raises(DatasetError, match=pattern):
            scan_dataset(tmp_path)
    meta.write_text("{not json\n")
    with pytest.raises(DatasetError, match="line 1 is not valid JSON"):
        scan_dataset(tmp_path)


def test_heldout_split_is_seeded_exact_and_respects_explicit_choices():
    targets = [f"p/t{i}.png" for i in range(20)]
    a, _ = _split_heldout(targets, {}, [], 0.2, seed=0, keys=set())
    b, _ = _split_heldout(targets, {}, [], 0.2, seed=0, keys=set())
    c, _ = _split_heldout(targets, {}, [], 0.2, seed=1, keys=set())
    assert a == b and len(a) == 4 and a != c
    forced, keys = _split_heldout(targets, {"p/t0.png": True, "p/t1.png": False}, ["p/t2.png", "p/t3.png#x"],
                                  0.2, seed=0, keys={"p/t3.png#x"})
    assert {"p/t0.png", "p/t2.png"} <= forced and "p/t1.png" not in forced and len(forced) == 4
    assert keys == {"p/t3.png#x"}
    assert _split_heldout(["only.png"], {}, [], 0.5, 0, set())[0] == set()  # never hold out the only target
    with pytest.raises(CacheError, match="heldout_list names"):
        _split_heldout(targets, {}, ["p/missing.png"], 0.0, 0, set())


def test_settings_from_dict_refuses_unknown_and_bad_values():
    assert CacheSettings.from_dict({"max_frames": 33}).max_frames == 33
    with pytest.raises(CacheError, match=r"unknown data setting\(s\) \['max_frame'\]"):
        CacheSettings.from_dict({"max_frame": 33})
    with pytest.raises(CacheError, match="not of the form 4k\\+1; use 81 or 85"):
        CacheSettings(max_frames=82)
    with pytest.raises(CacheError, match="multiples of 16"):
        CacheSettings(resolutions=[[250, 256]])


def test_open_refuses_a_missing_or_incomplete_cache(built, tmp_path):
    with pytest.raises(CacheError, match="is not a training cache"):
        TrainCache.open(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(built[1], broken)
    (broken / built[3].manifest["entries"][0]["latent"]).unlink()
    with pytest.raises(CacheError, match=r"incomplete: 1 shard\(s\) are missing"):
        TrainCache.open(broken)
