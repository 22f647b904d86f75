"""Export of trained adapters: official layout, bf16, metadata, LoRA merged, atomic and never overwriting."""
from __future__ import annotations

import pytest
import torch

from lynx_core.adapters import LynxAdapters, load_adapters
from lynx_core.train import export as export_mod
from lynx_core.train.export import ExportError, export_adapters, read_export_metadata
from lynx_core.train.lora import apply_lora, merge_lora

TINY = dict(dim=64, num_blocks=4, resampler_dim=64, resampler_heads=4, resampler_dim_head=16, resampler_depth=2)
META = {"base_model": "wan-tiny", "steps": 100, "dataset_fingerprint": "abc123", "mode": "lora"}


def _adapters(variant: str = "full") -> LynxAdapters:
    torch.manual_seed(0)
    return LynxAdapters.create(variant, **TINY)


def _same_in_bf16(a: LynxAdapters, b: LynxAdapters) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sb[k].dtype == torch.bfloat16, k
        assert torch.equal(sb[k], sa[k].to(torch.bfloat16)), k


@pytest.mark.parametrize("variant", ["full", "lite"])
def test_export_loads_back_in_bf16_with_metadata(tmp_path, variant):
    adapters = _adapters(variant)
    out = export_adapters(adapters, tmp_path / "lynx_trained", metadata=META)
    assert out == tmp_path / "lynx_trained"
    want = {"resampler.safetensors", "ip_layers.safetensors"} | ({"ref_layers.safetensors"} if variant == "full" else set())
    assert {p.name for p in out.iterdir()} == want
    loaded = load_adapters(out)
    assert loaded.variant == variant and loaded.config == adapters.config  # head split recovered from metadata
    _same_in_bf16(adapters, loaded)
    assert read_export_metadata(out) == {"base_model": "wan-tiny", "steps": "100", "dataset_fingerprint": "abc123",
                                         "mode": "lora"}
    assert [p.name for p in tmp_path.iterdir()] == ["lynx_trained"]  # no temporary left


def test_lora_adapters_are_merged_on_export(tmp_path):
    adapters = _adapters()
    params = apply_lora(adapters, rank=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    out = export_adapters(adapters, tmp_path / "out", dtype=None)
    loaded = load_adapters(out)
    merged = merge_lora(adapters)
    for k, v in merged.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not torch.equal(loaded.ip_layers["0"].to_k_ip.weight, _adapters().ip_layers["0"].to_k_ip.weight)
    assert "lora_A" not in str(list(loaded.state_dict()))


def test_combined_file_export(tmp_path):
    adapters = _adapters()
    path = export_adapters(adapters, tmp_path / "my_lynx.safetensors", metadata={"steps": 7})
    assert path.is_file()
    _same_in_bf16(adapters, load_adapters(path))
    assert read_export_metadata(path) == {"steps": "7"}


def test_refuses_to_overwrite_and_names_the_next_free_name(tmp_path):
    first = export_adapters(_adapters(), tmp_path / "out", metadata={"steps": 1})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(ExportError, match=r"already exists.*out_001.*if_exists='increment'"):
        export_adapters(_adapters(), tmp_path / "out", metadata={"steps": 2})
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    second = export_adapters(_adapters(), tmp_path / "out", metadata={"steps": 2}, if_exists="increment")
    third = export_adapters(_adapters(), tmp_path / "out", if_exists="increment")
    assert (second.name, third.name) == ("out_001", "out_002")
    assert read_export_metadata(first)["steps"] == "1" and read_export_metadata(second)["steps"] == "2"
    export_adapters(_adapters(), tmp_path / "one.safetensors")
    with pytest.raises(ExportError, match="one_001.safetensors"):
        export_adapters(_adapters(), tmp_path / "one.safetensors")


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "made_by_user").mkdir()
    out = export_adapters(_adapters(), tmp_path / "made_by_user")
    assert out == tmp_path / "made_by_user" and (out / "ip_layers.safetensors").is_file()


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    real = export_mod.save_file
    calls = []

    def dying(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(export_mod, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        export_adapters(_adapters(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(ExportError, match="if_exists"):
        export_adapters(_adapters(), tmp_path / "a", if_exists="overwrite")
    with pytest.raises(ExportError, match="metadata 'when'"):
        export_adapters(_adapters(), tmp_path / "a", metadata={"when": object()})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_adapters(_adapters(), tmp_path / "file")
    with pytest.raises(ExportError, match="meta device"):
        export_adapters(LynxAdapters.create("full", device="meta", **TINY), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------------------ loss plot (lynx_core/train/plot.py)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from lynx_core.train.plot import (  # noqa: E402
    AVERAGE_COLOUR,
    EVAL_COLOUR,
    RAW_COLOUR,
    PlotError,
    loss_plot_png,
    moving_average,
)


def _mask(img: Image.Image, colour) -> np.ndarray:
    return (np.asarray(img.convert("RGB")) == np.array(colour, dtype=np.uint8)).all(-1)


def _count(img: Image.Image, colour) -> int:
    return int(_mask(img, colour).sum())


def test_moving_average():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4, 0, 2], 10) == [4.0, 2.0, 2.0]
    assert moving_average([3.0], 1) == [3.0]
    assert moving_average([], 3) == []
    for bad in (0, -2, 1.5, True):
        with pytest.raises(PlotError, match="window"):
            moving_average([1.0], bad)


def test_loss_plot_draws_raw_average_and_eval(tmp_path):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(200, generator=g).tolist()
    history = [{"step": i + 1, "loss": 1.0 / (1 + 0.02 * i) + 0.4 * n} for i, n in enumerate(noise)]
    history[50]["loss"] = float("nan")  # a bad step is left out, not a crash
    evals = [{"step": s, "loss": 1.0 / (1 + 0.02 * s) + 0.2} for s in (50, 100, 150, 200)]
    path = loss_plot_png(history, tmp_path / "plots" / "loss.png", eval_history=evals, window=20, size=(640, 400))
    assert path == tmp_path / "plots" / "loss.png"
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (640, 400)
    img = img.convert("RGB")
    assert _count(img, AVERAGE_COLOUR) > 300    # a 3-px line across most of the plot
    assert _count(img, RAW_COLOUR) > 300
    assert _count(img, EVAL_COLOUR) > 4 * 20    # four filled points (plus the legend's)
    # The moving average runs from upper left (high loss) to lower right: its pixels' mean row
    # in the left quarter of the plot is above (smaller y) that in the right quarter.
    w, h = img.size
    ys, xs = np.nonzero(_mask(img, AVERAGE_COLOUR)[40:h - 48])
    left, right = ys[(xs >= 72) & (xs < w // 4)], ys[xs > 3 * w // 4]
    assert len(left) and len(right) and left.mean() < right.mean()
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temporary left


def test_loss_plot_is_replaced_atomically_and_handles_edge_cases(tmp_path):
    path = tmp_path / "loss.png"
    loss_plot_png([], path)  # nothing recorded yet: an empty frame, not an error
    empty = _count(Image.open(path).convert("RGB"), AVERAGE_COLOUR)
    loss_plot_png([0.5, 0.4, 0.45, 0.3], path)  # plain floats are steps 1..n
    assert _count(Image.open(path).convert("RGB"), AVERAGE_COLOUR) > empty == 0
    loss_plot_png([{"step": 3, "loss": 0.7}], path)  # one point, flat range
    assert Image.open(path).size == (960, 540)
    with pytest.raises(PlotError, match=r"history\[0\] has no 'loss'"):
        loss_plot_png([{"step": 1, "value": 0.3}], path)
    with pytest.raises(PlotError, match=".png"):
        loss_plot_png([0.1], tmp_path / "loss.jpg")
    with pytest.raises(PlotError, match="window"):
        loss_plot_png([0.1, 0.2], path, window=0)
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]
