"""Load Lynx Adapters finds Lynx files where ComfyUI-WanVideoWrapper users keep them
(models/diffusion_models/...), lists only loadable entries, and pairs split files lying side by side
(ComfyUI's folder registry faked, tiny files in a temporary models tree)."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import nodes.comfy_env as comfy_env
import nodes.loaders as loaders
from lynx_core.adapters import LynxAdapterError, LynxAdapters, combined_state, official_state, save_adapters
from nodes.loaders import LoadLynxAdapters

KW = dict(dim=64, num_blocks=2, resampler_dim=64, resampler_heads=1, resampler_dim_head=64, resampler_depth=1)
KIJAI_FULL_IP = "Wan2_1-T2V-14B-Lynx_full_ip_layers_fp16.safetensors"
KIJAI_FULL_REF = "Wan2_1-T2V-14B-Lynx_full_ref_layers_fp16.safetensors"
KIJAI_LITE_IP = "Wan2_1-T2V-14B-Lynx_lite_ip_layers_fp16.safetensors"


@pytest.fixture()
def models(monkeypatch, tmp_path):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    dm = tmp_path / "models" / "diffusion_models"
    dm.mkdir(parents=True)
    fp.folder_names_and_paths = {"diffusion_models": ([str(dm)], {".safetensors", ".gguf"})}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    comfy_env.register_model_folders()
    (tmp_path / "models" / "lynx").mkdir()
    monkeypatch.setattr(loaders, "_PARTS_CACHE", {})
    return tmp_path / "models"


def _adapters(variant: str, seed: int) -> LynxAdapters:
    torch.manual_seed(seed)
    return LynxAdapters.create(variant, **dict(KW, id_dim=32 if variant == "lite" else None))


def _split(adapters: LynxAdapters, folder, ip: str, ref: str | None, resampler: str) -> None:
    """Kijai's re-published layout: ID / Ref layers in block naming, the resampler on its own."""
    folder.mkdir(parents=True, exist_ok=True)
    comb = combined_state(adapters, include_resampler=False)
    save_file({k: v for k, v in comb.items() if ".ip_adapter." in k}, str(folder / ip))
    if ref:
        save_file({k: v for k, v in comb.items() if ".ref_adapter." in k}, str(folder / ref))
    save_file(official_state(adapters)["resampler"], str(folder / resampler))


def _same_weights(loaded: LynxAdapters, source: LynxAdapters, prefix: str = "") -> bool:
    want = {k: v for k, v in source.state_dict().items() if k.startswith(prefix)}
    got = loaded.state_dict()
    return bool(want) and all(k in got and torch.equal(got[k].float(), v.float()) for k, v in want.items())


def _lists() -> dict[str, list[str]]:
    inputs = LoadLynxAdapters.INPUT_TYPES()
    return {"adapters": inputs["required"]["adapters"][0], "ref_layers": inputs["optional"]["ref_layers"][0],
            "resampler": inputs["optional"]["resampler"][0]}


@pytest.fixture()
def kijai_tree(models):
    full, lite = _adapters("full", 0), _adapters("lite", 1)
    lynx = models / "diffusion_models" / "Lynx"
    _split(full, lynx, KIJAI_FULL_IP, KIJAI_FULL_REF, "lynx_full_resampler_fp32.safetensors")
    _split(lite, lynx, KIJAI_LITE_IP, None, "lynx_lite_resampler_fp32.safetensors")
    save_adapters(_adapters("full", 2), models / "diffusion_models" / "lynx_full")
    # Wan checkpoints live here too: skipped without a word; a broken Lynx-named file is reported.
    save_file({"model.diffusion_model.blocks.0.self_attn.q.weight": torch.zeros(2, 2)},
              str(models / "diffusion_models" / "wan2.1_t2v_14B_bf16.safetensors"))
    (models / "diffusion_models" / "lynx_broken.safetensors").write_bytes(b"\x00" * 16)
    return full, lite


def test_diffusion_models_entries_are_listed_when_loadable(kijai_tree, caplog):
    with caplog.at_level(logging.WARNING):
        lists = _lists()
    assert lists["adapters"] == ["diffusion_models/Lynx/" + KIJAI_FULL_IP, "diffusion_models/Lynx/" + KIJAI_LITE_IP,
                                 "diffusion_models/lynx_full"]
    assert lists["ref_layers"] == ["none", "diffusion_models/Lynx/" + KIJAI_FULL_REF,
                                   "diffusion_models/lynx_full/ref_layers.safetensors"]
    assert lists["resampler"] == ["none", "diffusion_models/Lynx/lynx_full_resampler_fp32.safetensors",
                                  "diffusion_models/Lynx/lynx_lite_resampler_fp32.safetensors",
                                  "diffusion_models/lynx_full/resampler.safetensors"]
    assert "wan2.1_t2v_14B_bf16" not in caplog.text, "Wan checkpoints are not adapter files: no warning"
    assert "lynx_broken.safetensors" in caplog.text


def test_the_id_file_alone_pairs_its_partners_beside_it(kijai_tree, caplog):
    full, lite = kijai_tree
    with caplog.at_level(logging.INFO):
        (h,) = LoadLynxAdapters().load("diffusion_models/Lynx/" + KIJAI_FULL_IP, "fp32")
    assert h.variant == "full" and h.has_ref and _same_weights(h.adapters, full)
    assert "lynx_full_resampler_fp32" in caplog.text and KIJAI_FULL_REF in caplog.text
    # Lite: the lite resampler (not the full one beside it), and no Ref layers.
    (h,) = LoadLynxAdapters().load("diffusion_models/Lynx/" + KIJAI_LITE_IP, "fp32")
    assert h.variant == "lite" and not h.has_ref and _same_weights(h.adapters, lite)
    # The variant folder under diffusion_models loads as in models/lynx.
    (h,) = LoadLynxAdapters().load("diffusion_models/lynx_full", "fp32")
    assert h.has_ref and _same_weights(h.adapters, _adapters("full", 2))


def test_explicit_choices_win(kijai_tree, models):
    full, _ = kijai_tree
    other = _adapters("full", 7)
    _split(other, models / "lynx" / "other", "o_full_ip_layers.safetensors", "o_full_ref_layers.safetensors",
           "o_full_resampler.safetensors")
    # An explicit resampler: exactly the files chosen (as before this feature: no Ref layers added).
    (h,) = LoadLynxAdapters().load("diffusion_models/Lynx/" + KIJAI_FULL_IP, "fp32",
                                   resampler="other/o_full_resampler.safetensors")
    assert not h.has_ref and _same_weights(h.adapters, other, "resampler.") and _same_weights(h.adapters, full, "ip_")
    # An explicit ref_layers file: that one, with the resampler paired from beside the ID file.
    (h,) = LoadLynxAdapters().load("diffusion_models/Lynx/" + KIJAI_FULL_IP, "fp32",
                                   ref_layers="other/o_full_ref_layers.safetensors")
    assert _same_weights(h.adapters, other, "ref_") and _same_weights(h.adapters, full, "resampler.")


def test_files_that_loaded_before_load_the_same_files(models):
    """A combined file with its own resampler gets nothing added, even with a Ref file beside it."""
    full = _adapters("full", 0)
    folder = models / "lynx" / "mix"
    folder.mkdir()
    comb = combined_state(full, include_resampler=True)
    save_file({k: v for k, v in comb.items() if ".ref_adapter." not in k}, str(folder / "x_full_ip_layers.safetensors"))
    save_file({k: v for k, v in comb.items() if ".ref_adapter." in k}, str(folder / "x_full_ref_layers.safetensors"))
    src = loaders.adapter_sources("mix/x_full_ip_layers.safetensors")
    assert src == folder / "x_full_ip_layers.safetensors"
    (h,) = LoadLynxAdapters().load("mix/x_full_ip_layers.safetensors", "fp32")
    assert not h.has_ref


def test_ambiguous_partners_are_not_guessed(models, caplog):
    full = _adapters("full", 0)
    folder = models / "diffusion_models" / "Lynx"
    _split(full, folder, KIJAI_FULL_IP, None, "lynx_full_resampler_a.safetensors")
    save_file(official_state(full)["resampler"], str(folder / "lynx_full_resampler_b.safetensors"))
    with caplog.at_level(logging.INFO):
        assert loaders.paired_files(folder / KIJAI_FULL_IP) == []
    assert "several resampler files" in caplog.text
    with pytest.raises(LynxAdapterError, match="no resampler weights"):
        LoadLynxAdapters().load("diffusion_models/Lynx/" + KIJAI_FULL_IP, "fp32")


def test_missing_entry_names_the_input_and_both_folders(models):
    with pytest.raises(FileNotFoundError, match=r"adapters: 'diffusion_models/Lynx/gone.safetensors' was not found "
                                                r"in the lynx model folders .* nor in diffusion_models"):
        LoadLynxAdapters().load("diffusion_models/Lynx/gone.safetensors", "fp32")


def test_wan2gp_module_files_load(models):
    """Wan2GP's Lynx module (``wan2.1_lynx_full_module_14B_bf16``: ID and Ref layers straight on the
    attention modules) beside its ``..._arc_resampler`` file loads as the same adapters."""
    full = _adapters("full", 4)
    folder = models / "diffusion_models"
    comb = combined_state(full, include_resampler=False)
    module = {k.replace(".ip_adapter.", ".").replace(".ref_adapter.", "."): v for k, v in comb.items()}
    assert "blocks.0.cross_attn.to_k_ip.weight" in module and "blocks.1.self_attn.to_v_ref.bias" in module
    assert "blocks.0.cross_attn.registers" in module
    save_file(module, str(folder / "wan2.1_lynx_full_module_14B_bf16.safetensors"))
    save_file(official_state(full)["resampler"], str(folder / "wan2.1_lynx_full_arc_resampler.safetensors"))
    lists = _lists()
    assert "diffusion_models/wan2.1_lynx_full_module_14B_bf16.safetensors" in lists["adapters"]
    assert "diffusion_models/wan2.1_lynx_full_module_14B_bf16.safetensors" in lists["ref_layers"]
    (h,) = LoadLynxAdapters().load("diffusion_models/wan2.1_lynx_full_module_14B_bf16.safetensors", "fp32")
    assert h.variant == "full" and h.has_ref and _same_weights(h.adapters, full)
