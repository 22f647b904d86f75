"""Loader, face, similarity and video nodes run for real on CPU (ComfyUI's folder registry faked)."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

import nodes.comfy_env as comfy_env
from lynx_core.adapters import LynxAdapters, save_adapters, save_adapters_combined
from lynx_core.video import probe, read_video
from nodes.face import LynxEncodeFaceID, LynxFaceSimilarity, similarity_plot
from nodes.loaders import LoadLynxAdapters
from nodes.payloads import AdaptersHandle
from nodes.video import LynxVideoCombine
from tests.conftest_face import astronaut, cat, models_root_with_arcface

KW = dict(dim=64, num_blocks=2, resampler_dim=64, resampler_heads=1, resampler_dim_head=64, resampler_depth=1)


@pytest.fixture()
def folder_paths(monkeypatch, tmp_path):
    """A stand-in for ComfyUI's folder_paths module with a models dir under tmp_path."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    extra = tmp_path / "elsewhere" / "lynx"
    fp.folder_names_and_paths = {"lynx": ([str(extra)], {".safetensors"})}

    def get_folder_paths(name):
        return list(fp.folder_names_and_paths[name][0])

    fp.get_folder_paths = get_folder_paths
    fp.get_output_directory = lambda: str(tmp_path / "output")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    comfy_env.register_model_folders()
    return fp, tmp_path / "models" / "lynx", extra


def test_model_folders_are_registered_and_extra_paths_kept(folder_paths):
    fp, ours, extra = folder_paths
    assert fp.folder_names_and_paths["lynx"][0] == [str(extra), str(ours)]
    for name in ("insightface", "facexlib"):
        assert fp.folder_names_and_paths[name][0] == [str(ours.parent / name)]
    comfy_env.register_model_folders()  # idempotent
    assert fp.folder_names_and_paths["lynx"][0] == [str(extra), str(ours)]


def test_loader_lists_and_loads_folders_and_combined_files(folder_paths):
    _fp, ours, extra = folder_paths
    torch.manual_seed(0)
    full = LynxAdapters.create("full", **KW)
    save_adapters(full, ours / "lynx_full")
    lite = LynxAdapters.create("lite", id_dim=32, **KW)
    save_adapters_combined(lite, extra / "sub" / "lite_combined.safetensors")
    entries = LoadLynxAdapters.INPUT_TYPES()["required"]["adapters"][0]
    assert "lynx_full" in entries and "sub/lite_combined.safetensors" in entries
    # A file inside a variant folder cannot be loaded on its own: not offered (tests/test_nodes_loader_lists.py).
    assert "lynx_full/resampler.safetensors" not in entries

    node = LoadLynxAdapters()
    (handle,) = node.load("lynx_full", "fp32")
    assert isinstance(handle, AdaptersHandle) and handle.variant == "full" and handle.has_ref
    torch.testing.assert_close(handle.adapters.state_dict()["ref_layers.1.to_k_ref.weight"],
                               full.state_dict()["ref_layers.1.to_k_ref.weight"])
    (handle,) = node.load("sub/lite_combined.safetensors", "bf16")
    assert handle.variant == "lite" and not handle.has_ref
    assert handle.adapters.resampler.proj_in.weight.dtype == torch.bfloat16


def test_loader_combines_split_files(folder_paths):
    """Re-published split files: an ID-adapter file plus separate ref_layers and resampler files."""
    _fp, ours, _extra = folder_paths
    torch.manual_seed(1)
    full = LynxAdapters.create("full", **KW)
    save_adapters(full, ours / "split")
    (handle,) = LoadLynxAdapters().load("split/ip_layers.safetensors", "fp32",
                                        ref_layers="split/ref_layers.safetensors",
                                        resampler="split/resampler.safetensors")
    assert handle.variant == "full" and handle.has_ref


def test_loader_errors_name_the_input(folder_paths):
    with pytest.raises(FileNotFoundError, match="adapters: 'missing' was not found"):
        LoadLynxAdapters().load("missing", "auto")
    with pytest.raises(ValueError, match="dtype"):
        from nodes.loaders import resolve_dtype
        resolve_dtype("int8")


@pytest.fixture()
def face_models(monkeypatch, tmp_path):
    root = models_root_with_arcface()
    monkeypatch.setattr(comfy_env, "models_root_dirs", lambda: [root])
    monkeypatch.setattr(comfy_env, "temp_directory", lambda: tmp_path / "temp")
    return root


def encode(image, on_no_face="error"):
    out = LynxEncodeFaceID().encode(image, "mtcnn", "largest", 0, "torch", on_no_face)
    return out["result"], out["ui"]


def _image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).float().div(255.0)[None]


def test_encode_face_id_on_a_real_photo(face_models):
    photo = astronaut()
    (face, preview, aligned), ui = encode(_image(photo))
    assert face.has_identity and face.embedding.shape == (512,)
    assert abs(float(face.embedding.norm()) - 1.0) < 1e-4
    assert preview.shape == (1, *photo.shape) and aligned.shape == (1, 256, 256, 3)
    assert not torch.equal(preview[0], _image(photo)[0]), "the preview must show the detection"
    torch.testing.assert_close(aligned[0], torch.from_numpy(face.crop256[0]).float() / 255.0)
    # the node shows its preview itself: a temp PNG per photo, and the caption text
    shown = face_models_temp(ui)
    assert len(shown) == 1 and shown[0].exists()
    assert "Identity from 1 face" in ui["lynx_faces"][0]


def face_models_temp(ui):
    return [comfy_env.temp_directory() / rec["filename"] for rec in ui["images"] if rec["type"] == "temp"]


def test_encode_face_id_without_a_face(face_models):
    with pytest.raises(Exception, match=r"image: no face found in batch index 0 \(of 1, 451x300\)"):
        encode(_image(cat()))
    (face, _preview, aligned), ui = encode(_image(cat()), "pass_through")
    assert face.embedding is None and aligned.shape == (1, 256, 256, 3)
    assert "No identity" in ui["lynx_faces"][0]


def test_face_similarity_scores_each_frame(face_models):
    photo = astronaut()
    (face, _p, _a), _ui = encode(_image(photo))
    other = cat()
    frames = torch.cat([_image(photo), _image(np.ascontiguousarray(other[: photo.shape[0], : photo.shape[1]]))
                        if other.shape[:2] >= photo.shape[:2] else _image(np.zeros_like(photo))])
    mean, per_frame, plot = LynxFaceSimilarity().score(frames, face, "mtcnn")
    scores = json.loads(per_frame)
    assert len(scores) == 2 and scores[1] is None
    assert scores[0] == pytest.approx(1.0, abs=1e-4)  # the same photo gives the same embedding
    assert mean == pytest.approx(scores[0])
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3


def test_similarity_plot_marks_frames():
    img = similarity_plot([0.5, None, 0.7])
    assert img.dtype == np.uint8 and img.shape == (320, 768, 3)
    assert not np.array_equal(img, similarity_plot([0.1, 0.2, 0.3]))


# ------------------------------------------------------------------------------------ video
@pytest.fixture()
def out_dir(monkeypatch, tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setattr(comfy_env, "output_directory", lambda: out)
    return out


def _frames(n=6, h=36, w=50):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, h, w, 3, generator=g)
    return torch.cat([(base + i / n) % 1.0 for i in range(n)])


@pytest.mark.parametrize("fmt", ["mp4", "webm", "webp", "gif"])
def test_video_combine_writes_numbered_files_with_the_workflow(out_dir, fmt):
    node = LynxVideoCombine()
    prompt = {"1": {"class_type": "LynxSampler", "inputs": {}}}
    extra = {"workflow": {"nodes": [{"id": 1}]}}
    res = node.combine(_frames(), 12.0, fmt, "Lynx/test", 19, True, prompt=prompt, extra_pnginfo=extra)
    entry = res["ui"]["videos"][0]
    path = out_dir / entry["subfolder"] / entry["filename"]
    assert res["result"] == (str(path),) and path.is_file()
    assert entry["subfolder"] == "Lynx" and entry["type"] == "output" and entry["frame_rate"] == 12.0
    assert entry["format"].endswith(fmt)
    info = probe(path)
    assert read_video(path).shape[0] == 6 or fmt == "gif"
    meta = info["metadata"]
    if fmt == "gif":
        meta = json.loads(meta["comment"]) if "comment" in meta else meta
    blob = json.dumps(meta)
    assert "LynxSampler" in blob and "workflow" in blob
    again = node.combine(_frames(), 12.0, fmt, "Lynx/test", 19, False)
    second = out_dir / "Lynx" / again["ui"]["videos"][0]["filename"]
    assert second != path and path.is_file() and second.is_file()
    assert "LynxSampler" not in json.dumps(probe(second)["metadata"])


def test_video_combine_muxes_audio_into_mp4(out_dir):
    import av

    rate = 16000
    t = torch.arange(rate) / rate
    audio = {"waveform": torch.sin(2 * torch.pi * 440 * t).repeat(1, 2, 1) * 0.3, "sample_rate": rate}
    res = LynxVideoCombine().combine(_frames(8), 8.0, "mp4", "lynx_audio", 23, True, audio=audio)
    path = out_dir / res["ui"]["videos"][0]["filename"]
    with av.open(str(path)) as f:
        assert len(f.streams.video) == 1 and len(f.streams.audio) == 1
        audio_stream = f.streams.audio[0]
        samples = sum(fr.samples for fr in f.decode(audio_stream))
    assert 0.8 * rate <= samples <= 1.2 * rate  # cut to the 1 s video
    assert read_video(path).shape[0] == 8


def test_video_combine_audio_in_webm_and_dropped_for_gif(out_dir, caplog):
    rate = 22050
    t = torch.arange(rate // 2) / rate  # 0.5 s of sound for a 1 s clip: padded with silence
    wave = torch.stack([torch.sin(2 * torch.pi * 330 * t), torch.zeros_like(t)])[None] * 0.3  # [1, 2, S]
    audio = {"waveform": wave, "sample_rate": rate}
    res = LynxVideoCombine().combine(_frames(8), 8.0, "webm", "lynx_audio", 30, True, audio=audio)
    info = probe(out_dir / res["ui"]["videos"][0]["filename"])
    assert info["audio"]["codec"] == "opus" and info["audio"]["channels"] == 2 and info["frames"] == 8
    with caplog.at_level("WARNING"):
        res = LynxVideoCombine().combine(_frames(8), 8.0, "gif", "lynx_audio", 19, True, audio=audio)
    path = out_dir / res["ui"]["videos"][0]["filename"]
    assert path.is_file() and probe(path)["audio"] is None
    assert any("cannot hold sound" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="audio: expected a ComfyUI AUDIO"):
        LynxVideoCombine().combine(_frames(2), 8.0, "mp4", "x", 19, True, audio={"samples": wave})
    with pytest.raises(ValueError, match="audio: waveform must be"):
        LynxVideoCombine().combine(_frames(2), 8.0, "mp4", "x", 19, True,
                                   audio={"waveform": torch.zeros(1, 1, 2, 8), "sample_rate": rate})


def test_video_combine_rejects_bad_input(out_dir):
    with pytest.raises(ValueError, match="images"):
        LynxVideoCombine().combine(torch.zeros(0, 8, 8, 3), 8.0, "mp4", "x", 19, True)
    with pytest.raises(ValueError, match="outside"):
        LynxVideoCombine().combine(_frames(2), 8.0, "mp4", "../escape", 19, True)
