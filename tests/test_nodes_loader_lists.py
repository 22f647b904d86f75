"""Load Lynx Adapters offers only loadable entries and reloads files replaced on disk
(ComfyUI's folder registry faked; IS_CHANGED called the way ComfyUI calls it)."""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

import nodes.comfy_env as comfy_env
import nodes.loaders as loaders
from lynx_core.adapters import LynxAdapters, combined_state, official_state, save_adapters, save_adapters_combined
from nodes.loaders import LoadLynxAdapters

KW = dict(dim=64, num_blocks=2, resampler_dim=64, resampler_heads=1, resampler_dim_head=64, resampler_depth=1)


@pytest.fixture()
def lynx_dir(monkeypatch, tmp_path):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {}
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    comfy_env.register_model_folders()
    root = tmp_path / "models" / "lynx"
    root.mkdir(parents=True)
    monkeypatch.setattr(loaders, "_PARTS_CACHE", {})
    return root


def _lists() -> dict[str, list[str]]:
    inputs = LoadLynxAdapters.INPUT_TYPES()
    return {"adapters": inputs["required"]["adapters"][0], "ref_layers": inputs["optional"]["ref_layers"][0],
            "resampler": inputs["optional"]["resampler"][0]}


def _adapters(variant: str, seed: int) -> LynxAdapters:
    torch.manual_seed(seed)
    return LynxAdapters.create(variant, **dict(KW, id_dim=32 if variant == "lite" else None))


def test_lists_offer_only_loadable_entries(lynx_dir):
    full = _adapters("full", 0)
    save_adapters(full, lynx_dir / "lynx_full")
    save_adapters_combined(_adapters("lite", 1), lynx_dir / "lite_combined.safetensors")
    # Re-published split files: ID layers and Ref layers in block naming, resampler in official naming.
    comb = combined_state(full, include_resampler=False)
    split = lynx_dir / "split"
    split.mkdir()
    save_file({k: v for k, v in comb.items() if ".ip_adapter." in k}, str(split / "x_ip_layers.safetensors"))
    save_file({k: v for k, v in comb.items() if ".ref_adapter." in k}, str(split / "x_ref_layers.safetensors"))
    save_file(official_state(full)["resampler"], str(split / "x_resampler.safetensors"))
    # Not loadable: a Wan checkpoint put here by mistake, and a truncated file.
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(lynx_dir / "wan_by_mistake.safetensors"))
    broken = lynx_dir / "broken.safetensors"
    broken.write_bytes((lynx_dir / "lite_combined.safetensors").read_bytes()[:-64])

    lists = _lists()
    assert lists["adapters"] == ["lite_combined.safetensors", "lynx_full", "split/x_ip_layers.safetensors"]
    assert lists["ref_layers"] == ["none", "lynx_full/ref_layers.safetensors", "split/x_ref_layers.safetensors"]
    assert lists["resampler"] == ["none", "lite_combined.safetensors", "lynx_full/resampler.safetensors",
                                  "split/x_resampler.safetensors"]
    (handle,) = LoadLynxAdapters().load("split/x_ip_layers.safetensors", "fp32",
                                        ref_layers="split/x_ref_layers.safetensors",
                                        resampler="split/x_resampler.safetensors")
    assert handle.variant == "full" and handle.has_ref


def test_headers_are_read_once_per_file_version(lynx_dir, monkeypatch):
    save_adapters_combined(_adapters("lite", 1), lynx_dir / "a.safetensors")
    reads = []
    real = loaders.adapter_file_parts
    monkeypatch.setattr(loaders, "adapter_file_parts", lambda p: reads.append(p) or real(p))
    _lists()
    _lists()
    assert len(reads) == 1
    path = lynx_dir / "a.safetensors"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    _lists()
    assert len(reads) == 2


def test_replaced_files_reload_without_a_restart(lynx_dir):
    first, second = _adapters("full", 0), _adapters("full", 7)
    save_adapters(first, lynx_dir / "lynx_full")
    stamp = LoadLynxAdapters.IS_CHANGED(adapters="lynx_full", dtype="fp32", ref_layers="none", resampler="none")
    assert stamp == LoadLynxAdapters.IS_CHANGED(adapters="lynx_full", dtype="fp32")  # stable while nothing changes
    (h1,) = LoadLynxAdapters().load("lynx_full", "fp32")

    save_adapters(second, lynx_dir / "lynx_full", overwrite=True)
    path = lynx_dir / "lynx_full" / "ip_layers.safetensors"
    st = path.stat()  # same size; make sure the mtime moves even on coarse-clock file systems
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert LoadLynxAdapters.IS_CHANGED(adapters="lynx_full", dtype="fp32") != stamp
    (h2,) = LoadLynxAdapters().load("lynx_full", "fp32")
    key = "ip_layers.0.to_k_ip.weight"
    torch.testing.assert_close(h2.adapters.state_dict()[key], second.state_dict()[key])
    assert not torch.equal(h1.adapters.state_dict()[key], h2.adapters.state_dict()[key])
    # An entry that no longer resolves gives a value, not an exception; load() names the input.
    assert LoadLynxAdapters.IS_CHANGED(adapters="gone", dtype="fp32").startswith("unresolved")
