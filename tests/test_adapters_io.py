"""Adapter files: both layouts round trip, the variant is detected, and every misfit is explained."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lynx_core.adapters import (
    LynxAdapterError,
    LynxAdapters,
    combined_state,
    combined_to_official,
    detect_variant,
    load_adapters,
    official_state,
    official_to_combined,
    save_adapters,
    save_adapters_combined,
)

SIZES = dict(dim=64, num_blocks=4, resampler_dim=64, resampler_heads=4, resampler_dim_head=16)


def make(variant: str, seed: int = 0, **kw) -> LynxAdapters:
    torch.manual_seed(seed)
    args = dict(SIZES, id_dim=32 if variant == "lite" else None)
    args.update(kw)
    return LynxAdapters.create(variant, **args)


def assert_same(a: LynxAdapters, b: LynxAdapters) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k].to(sa[k].dtype)), k


def rewrite(path: Path, change) -> None:
    """Load a file, let ``change`` edit the dict, write it back."""
    sd = dict(load_file(str(path)))
    change(sd)
    save_file(sd, str(path))


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("variant", ["full", "lite"])
def test_official_layout_round_trip(tmp_path, variant):
    a = make(variant)
    files = save_adapters(a, tmp_path / f"lynx_{variant}")
    names = sorted(p.name for p in files)
    want = ["ip_layers.safetensors", "resampler.safetensors"] + (["ref_layers.safetensors"] if variant == "full" else [])
    assert names == sorted(want)
    ip_keys = set(load_file(str(tmp_path / f"lynx_{variant}" / "ip_layers.safetensors")))
    if variant == "full":
        assert {"0.registers", "3.to_v_ip.bias"} <= ip_keys
    else:  # list index i is block 2i: 4 blocks -> indices 0, 1
        assert ip_keys == {f"{i}.{n}.weight" for i in (0, 1) for n in ("to_k_ip", "to_v_ip")}
    b = load_adapters(tmp_path / f"lynx_{variant}")
    assert b.variant == variant and not b.training
    assert not any(p.requires_grad for p in b.parameters())
    assert_same(a, b)
    emb = torch.randn(2, 512)
    torch.testing.assert_close(a.encode_identity(emb), b.encode_identity(emb), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_combined_layout_round_trip(tmp_path, variant):
    a = make(variant, seed=1)
    path = save_adapters_combined(a, tmp_path / "lynx.safetensors")
    keys = set(load_file(str(path)))
    assert "resampler.latents" in keys
    ip_blocks = {int(k.split(".")[1]) for k in keys if ".cross_attn.ip_adapter." in k}
    assert ip_blocks == ({0, 1, 2, 3} if variant == "full" else {0, 2})
    assert any(".self_attn.ref_adapter." in k for k in keys) == (variant == "full")
    b = load_adapters(str(path))
    assert b.variant == variant
    assert_same(a, b)


def test_separate_combined_files_with_prefix_bare_resampler_and_fp16(tmp_path):
    """Re-published style: ip and ref files in block naming (behind a prefix), bare resampler in fp32."""
    a = make("full", seed=2)
    comb = combined_state(a, include_resampler=False)
    ip = {f"diffusion_model.{k}": v.half() for k, v in comb.items() if ".ip_adapter." in k}
    ref = {f"diffusion_model.{k}": v.half() for k, v in comb.items() if ".ref_adapter." in k}
    save_file(ip, str(tmp_path / "Lynx_full_ip_layers_fp16.safetensors"))
    save_file(ref, str(tmp_path / "Lynx_full_ref_layers_fp16.safetensors"))
    save_file(official_state(a)["resampler"], str(tmp_path / "lynx_full_resampler_fp32.safetensors"))
    files = sorted(tmp_path.glob("*.safetensors"))
    b = load_adapters(files)
    assert b.variant == "full" and b.has_ref
    assert b.ip_layers["0"].to_k_ip.weight.dtype == torch.float16
    assert b.resampler.latents.dtype == torch.float32
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        tol = 0 if k.startswith("resampler.") else 1e-3
        torch.testing.assert_close(sb[k].float(), sa[k], rtol=tol, atol=tol)
    c = load_adapters(files, dtype=torch.bfloat16)
    assert {p.dtype for p in c.parameters()} == {torch.bfloat16}


def test_lite_id_with_full_ref_mix(tmp_path):
    lite, full = make("lite", seed=3), make("full", seed=4)
    lite_path = save_adapters_combined(lite, tmp_path / "lite.safetensors")
    ref_only = {k: v for k, v in combined_state(full, include_resampler=False).items() if ".ref_adapter." in k}
    save_file(ref_only, str(tmp_path / "full_ref.safetensors"))
    b = load_adapters([lite_path, tmp_path / "full_ref.safetensors"])
    assert b.variant == "lite" and b.ip_block_indices() == [0, 2] and b.ref_block_indices() == [0, 1, 2, 3]
    torch.testing.assert_close(b.ref_layers["3"].to_v_ref.weight, full.ref_layers["3"].to_v_ref.weight)


def test_resampler_heads_from_metadata_or_argument(tmp_path):
    a = make("lite", seed=5)
    save_adapters(a, tmp_path / "v")
    assert load_adapters(tmp_path / "v").resampler.heads == 4  # written as file metadata
    # Without metadata the official 64-wide heads are assumed (here: 1 head), unless told.
    for name in ("resampler.safetensors", "ip_layers.safetensors"):
        rewrite(tmp_path / "v" / name, lambda sd: None)
    assert load_adapters(tmp_path / "v").resampler.heads == 1
    b = load_adapters(tmp_path / "v", resampler_heads=4)
    emb = torch.randn(1, 512)
    torch.testing.assert_close(b.encode_identity(emb), a.encode_identity(emb), rtol=0, atol=0)


def test_save_never_overwrites_silently(tmp_path):
    a = make("full")
    save_adapters(a, tmp_path / "v")
    before = (tmp_path / "v" / "ip_layers.safetensors").read_bytes()
    with pytest.raises(LynxAdapterError, match="overwrite"):
        save_adapters(make("full", seed=9), tmp_path / "v")
    assert (tmp_path / "v" / "ip_layers.safetensors").read_bytes() == before
    save_adapters(make("full", seed=9), tmp_path / "v", dtype=torch.bfloat16, overwrite=True)
    assert load_adapters(tmp_path / "v").resampler.latents.dtype == torch.bfloat16
    assert not list((tmp_path / "v").glob("*.partial"))
    path = save_adapters_combined(a, tmp_path / "c.safetensors")
    with pytest.raises(LynxAdapterError, match="overwrite"):
        save_adapters_combined(a, path)
    with pytest.raises(LynxAdapterError, match=".safetensors"):
        save_adapters_combined(a, tmp_path / "c.pt")
    with pytest.raises(LynxAdapterError, match="meta"):
        save_adapters(LynxAdapters.create("lite", device="meta"), tmp_path / "meta")


# ------------------------------------------------------------------------- keys and variants
def _keys(variant: str, layout: str) -> list[str]:
    a = LynxAdapters.create(variant, device="meta", **dict(SIZES, id_dim=32 if variant == "lite" else None))
    if layout == "internal":
        return list(a.state_dict())
    if layout == "combined":
        return list(combined_state(a))
    return [k for sd in official_state(a).values() for k in sd]


@pytest.mark.parametrize("layout", ["official", "combined", "internal"])
@pytest.mark.parametrize("variant", ["full", "lite"])
def test_detect_variant(variant, layout):
    assert detect_variant(_keys(variant, layout)) == variant


def test_detect_variant_edge_cases():
    assert detect_variant(["0.to_k_ref.weight", "0.to_k_ref.bias"]) == "full"  # Ref only exists in full
    assert detect_variant(["blocks.0.cross_attn.ip_adapter.to_k_ip.weight",
                           "blocks.0.self_attn.ref_adapter.to_k_ref.weight"]) == "lite"  # lite ID + Ref mix
    with pytest.raises(LynxAdapterError, match="not a Lynx adapter"):
        detect_variant(["latents", "blocks.0.self_attn.q.weight"])


def test_key_maps_both_ways():
    a = make("lite", seed=6)
    official = official_state(a)
    combined = official_to_combined(official, "lite")
    assert "blocks.2.cross_attn.ip_adapter.to_v_ip.weight" in combined  # index 1 -> block 2
    assert combined["blocks.2.cross_attn.ip_adapter.to_v_ip.weight"] is official["ip_layers"]["1.to_v_ip.weight"]
    back = combined_to_official(combined)
    assert {p: set(sd) for p, sd in back.items()} == {p: set(sd) for p, sd in official.items()}
    full = official_state(make("full", seed=7))
    assert set(combined_to_official(official_to_combined(full, "full"), "full")["ref_layers"]) == set(full["ref_layers"])
    with pytest.raises(LynxAdapterError, match="every 2nd block"):
        combined_to_official({"blocks.3.cross_attn.ip_adapter.to_k_ip.weight": 0}, "lite")


# ------------------------------------------------------------------------- misfits
def _folder(tmp_path: Path, variant: str = "full") -> Path:
    folder = tmp_path / f"lynx_{variant}"
    save_adapters(make(variant), folder)
    return folder


def _err(source, **kw) -> str:
    with pytest.raises(LynxAdapterError) as err:
        load_adapters(source, **kw)
    return str(err.value)


def test_wrong_width_in_one_block_names_file_key_and_shapes(tmp_path):
    folder = _folder(tmp_path)
    rewrite(folder / "ip_layers.safetensors", lambda sd: sd.update({"2.to_k_ip.weight": torch.zeros(48, 64)}))
    msg = _err(folder)
    assert str(folder / "ip_layers.safetensors") in msg
    assert "'2.to_k_ip.weight'" in msg and "[64, 64]" in msg and "[48, 64]" in msg


def test_files_for_another_model_width(tmp_path):
    folder = _folder(tmp_path)
    msg = _err(folder, dim=128, num_blocks=4)
    assert "ip_layers.safetensors" in msg and "'0.to_k_ip.weight'" in msg
    assert "expected shape [128, 64], found [64, 64]" in msg
    assert "ref_layers.safetensors" in msg and "[128, 128]" in msg
    assert "64-wide" in msg and "128-wide" in msg


def test_wrong_block_count(tmp_path):
    folder = _folder(tmp_path)
    msg = _err(folder, num_blocks=6)
    ip, ref = folder / "ip_layers.safetensors", folder / "ref_layers.safetensors"
    assert f"{ip}: no weights for blocks 4, 5 (e.g. key '4.registers' is missing, expected shape [1, 16, 64])" in msg
    assert f"{ref}: no weights for blocks 4, 5 (e.g. key '4.to_k_ref.weight' is missing" in msg
    assert "cover 4 blocks but the model has 6" in msg
    msg = _err(folder, num_blocks=2)
    assert f"{ip}: blocks 2, 3 are not part of a Lynx full adapter for 2 blocks (e.g. key '2." in msg
    # A lite folder holds every 2nd block: 4 blocks in the file (indices 0, 1) against 8 expected.
    msg = _err(_folder(tmp_path, "lite"), num_blocks=8)
    assert "no weights for blocks 4, 6 (e.g. key '2.to_k_ip.weight' is missing, expected shape [64, 32])" in msg


def test_missing_keys_in_official_and_combined_files(tmp_path):
    folder = _folder(tmp_path)
    rewrite(folder / "ip_layers.safetensors", lambda sd: sd.pop("1.to_v_ip.bias"))
    msg = _err(folder)
    assert str(folder / "ip_layers.safetensors") in msg
    assert "'1.to_v_ip.bias' is missing (expected shape [64])" in msg
    path = save_adapters_combined(make("full"), tmp_path / "c.safetensors")
    rewrite(path, lambda sd: sd.pop("blocks.2.self_attn.ref_adapter.to_k_ref.weight"))
    msg = _err(path)
    assert str(path) in msg
    assert "'blocks.2.self_attn.ref_adapter.to_k_ref.weight' is missing (expected shape [64, 64])" in msg
    assert "[2]" in msg  # the broken block is named


def test_resampler_from_the_other_variant(tmp_path):
    full = _folder(tmp_path, "full")
    lite = _folder(tmp_path, "lite")
    (full / "resampler.safetensors").write_bytes((lite / "resampler.safetensors").read_bytes())
    msg = _err(full)
    assert "resampler.safetensors" in msg and "'proj_out.weight'" in msg
    assert "expected shape [64, 64], found [32, 64]" in msg
    assert "different variants" in msg


def test_incomplete_or_swapped_folders(tmp_path):
    folder = _folder(tmp_path)
    (folder / "ref_layers.safetensors").unlink()
    assert "ref_layers.safetensors" in _err(folder)
    (folder / "ip_layers.safetensors").rename(folder / "ref_layers.safetensors")
    msg = _err(folder)
    assert "ip_layers.safetensors missing" in msg and "ref_layers.safetensors" in msg
    folder2 = _folder(tmp_path / "b")
    ip, ref = folder2 / "ip_layers.safetensors", folder2 / "ref_layers.safetensors"
    ip_bytes = ip.read_bytes()
    ip.write_bytes(ref.read_bytes())
    ref.write_bytes(ip_bytes)
    assert "swapped" in _err(folder2)
    assert "does not exist" in _err(tmp_path / "nowhere")


def test_resampler_or_ip_missing_and_duplicates(tmp_path):
    a = make("full")
    no_res = save_adapters_combined(a, tmp_path / "nores.safetensors", include_resampler=False)
    assert "no resampler weights" in _err(no_res)
    folder = _folder(tmp_path)
    assert "ID-adapter layers" in _err([folder / "resampler.safetensors", folder / "ref_layers.safetensors"])
    both = save_adapters_combined(a, tmp_path / "both.safetensors")
    assert "given twice" in _err([both, folder / "ip_layers.safetensors"])


def test_variant_mismatch_and_foreign_keys(tmp_path):
    folder = _folder(tmp_path)
    assert "lite adapters were asked for" in _err(folder, variant="lite")
    bad = tmp_path / "wan.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "latents": torch.zeros(1, 16, 64)}, str(bad))
    msg = _err(bad)
    assert str(bad) in msg and "'blocks.0.self_attn.q.weight' [4, 4]" in msg


def test_only_safetensors_are_accepted(tmp_path):
    ckpt = tmp_path / "ip_layers.ckpt"
    torch.save({"0.to_k_ip.weight": torch.zeros(2, 2)}, ckpt)
    msg = _err(ckpt)
    assert str(ckpt) in msg and "only .safetensors" in msg and "pickle" in msg

    renamed = tmp_path / "renamed.safetensors"
    torch.save({"0.to_k_ip.weight": torch.zeros(2, 2)}, renamed)
    msg = _err(renamed)
    assert "not a valid safetensors file" in msg and "pickle" in msg

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert "not valid JSON" in _err(garbage)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    assert "shorter than" in _err(tmp_path / "tiny.safetensors")


def test_truncated_file_is_reported(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "ip_layers.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    msg = _err(folder)
    assert str(path) in msg and "truncated" in msg
