"""Damaged adapter files: NaN/inf weights and headers that do not match the data are refused, and
the error blames the file (with the fix), never an intact key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lynx_core.adapters import LynxAdapterError, LynxAdapters, load_adapters, save_adapters
from lynx_core.adapters.io import adapter_file_parts

SIZES = dict(dim=64, num_blocks=4, resampler_dim=64, resampler_heads=4, resampler_dim_head=16)


def _folder(tmp_path: Path, variant: str = "full") -> Path:
    torch.manual_seed(0)
    folder = tmp_path / f"lynx_{variant}"
    save_adapters(LynxAdapters.create(variant, **dict(SIZES, id_dim=32 if variant == "lite" else None)), folder)
    return folder


def _err(source, **kw) -> str:
    with pytest.raises(LynxAdapterError) as err:
        load_adapters(source, **kw)
    return str(err.value)


# ------------------------------------------------------------------------- NaN / inf weights
def test_nan_and_inf_weights_are_refused_naming_file_keys_and_counts(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "ip_layers.safetensors"
    sd = dict(load_file(str(path)))
    sd["1.to_k_ip.weight"][0, :3] = float("nan")
    sd["2.to_v_ip.bias"][5] = float("inf")
    sd["2.to_v_ip.bias"][6] = -float("inf")
    save_file(sd, str(path))
    msg = _err(folder)
    assert str(path) in msg
    assert "'1.to_k_ip.weight' (3 NaN, 0 inf)" in msg and "'2.to_v_ip.bias' (0 NaN, 2 inf)" in msg
    assert "5 weight value(s)" in msg and "in 2 key(s)" in msg
    assert "download it again" in msg and "earlier checkpoint" in msg
    # The intact files are not blamed.
    assert "ref_layers.safetensors" not in msg and "resampler.safetensors" not in msg


def test_nan_in_fp8_weights_is_found(tmp_path):
    folder = _folder(tmp_path, "lite")
    path = folder / "resampler.safetensors"
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(path)).items()}
    sd["latents"].view(torch.uint8)[0, 0, 0] = 0x7F  # e4m3fn NaN bit pattern
    save_file(sd, str(path))
    msg = _err(folder)
    assert str(path) in msg and "'latents' (1 NaN, 0 inf)" in msg


def test_fp16_overflow_on_load_names_the_dtype_fix(tmp_path):
    folder = _folder(tmp_path, "lite")
    path = folder / "ip_layers.safetensors"
    sd = dict(load_file(str(path)))
    sd["0.to_k_ip.weight"][0, 0] = 1e6  # finite in fp32, inf in fp16
    save_file(sd, str(path))
    assert load_adapters(folder).ip_layers["0"].to_k_ip.weight[0, 0] == 1e6
    msg = _err(folder, dtype=torch.float16)
    assert "'0.to_k_ip.weight'" in msg and "fp16 range" in msg and "bf16 or fp32" in msg


# ------------------------------------------------------------------------- header vs data
def _rewrite_header(path: Path, change, tail: bytes = b"", cut: int = 0) -> None:
    """Edit the JSON header in place and keep the data bytes (optionally with a tail or cut)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = raw[8 + n:]
    data = data[: len(data) - cut] if cut else data
    path.write_bytes(len(text).to_bytes(8, "little") + text + data + tail)


def _shift(key: str, delta_begin: int, delta_end: int):
    def change(header):
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin + delta_begin, end + delta_end]
    return change


def _keys_by_offset(path: Path) -> list[str]:
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


@pytest.mark.parametrize("case,words", [
    ("overlap", "overlap"),
    ("size", "dtype and shape need"),
    ("negative", "out of range"),
    ("trailing", "after the last tensor"),
])
def test_header_that_does_not_match_the_data_blames_the_file(tmp_path, case, words):
    folder = _folder(tmp_path)
    path = folder / "ref_layers.safetensors"
    keys = _keys_by_offset(path)
    if case == "overlap":  # the second tensor starts 4 bytes early and ends 4 early: same size, overlapping
        _rewrite_header(path, _shift(keys[1], -4, -4))
    elif case == "size":  # one tensor's span is shorter than its shape needs
        _rewrite_header(path, _shift(keys[0], 0, -4))
    elif case == "negative":
        _rewrite_header(path, _shift(keys[0], -8, 0))
    else:
        _rewrite_header(path, lambda h: None, tail=b"\0" * 16)
    msg = _err(folder)
    assert str(path) in msg and "corrupt" in msg and words in msg
    assert "download the file again" in msg
    assert not any(f"'{k}'" in msg for k in keys), "no single key is to blame"


def test_file_shorter_than_its_header_says_is_truncated(tmp_path):
    folder = _folder(tmp_path)
    path = folder / "ip_layers.safetensors"
    _rewrite_header(path, lambda h: None, cut=4)
    msg = _err(folder)
    assert str(path) in msg and "truncated" in msg and "download the file again" in msg


def test_adapter_file_parts_reads_headers_only(tmp_path):
    folder = _folder(tmp_path)
    assert adapter_file_parts(folder / "ip_layers.safetensors") == {"ip"}
    assert adapter_file_parts(folder / "ref_layers.safetensors") == {"ref"}
    assert adapter_file_parts(folder / "resampler.safetensors") == {"resampler"}
    other = tmp_path / "wan.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(LynxAdapterError, match="not a Lynx adapter key"):
        adapter_file_parts(other)
