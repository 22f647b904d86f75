"""`python -m lynx_core train` in real processes: resume across processes, DDP with gloo, tiny demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lynx_core.adapters import load_adapters

ROOT = Path(__file__).resolve().parents[1]

BASE = {"wan": "tiny", "dataset": "synthetic", "mode": "full", "lr": 1e-3, "token_budget": 48,
        "eval_every": 5, "save_every": 5, "log_every": 5, "device": "cpu", "seed": 3}


def run_cli(*args: str, env_extra: dict | None = None, module=("-m", "lynx_core")) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def write_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**BASE, **overrides}))
    return path


def last_checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step_*"))[-1]


def test_resume_in_a_fresh_process_equals_straight_training(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = run_cli("train", str(write_config(tmp_path / "a.json", out=str(straight), max_steps=20)))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(write_config(tmp_path / "b.json", out=str(split), max_steps=10)))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(tmp_path / "b.json"), "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    a, b = last_checkpoint(straight), last_checkpoint(split)
    assert a.name == b.name == "step_000020"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha = json.loads((a / "state.json").read_text())
    hb = json.loads((b / "state.json").read_text())
    assert [h["loss"] for h in ha["loss_history"]] == [h["loss"] for h in hb["loss_history"]]
    assert ha["data_cursor"] == hb["data_cursor"]


def test_resume_refuses_another_config(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", str(write_config(tmp_path / "a.json", out=str(out), max_steps=5))).returncode == 0
    r = run_cli("train", str(write_config(tmp_path / "b.json", out=str(out), max_steps=10, mode="id_only")))
    assert r.returncode == 2 and "error:" in r.stderr
    assert "mode" in r.stderr and "--out" in r.stderr


@pytest.mark.parametrize("distributed,port", [("ddp", "29517"), ("fsdp", "29518")])
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, distributed, port):
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_cli("train", str(write_config(tmp_path / "one.json", out=str(one), max_steps=6, grad_accum=2,
                                          save_every=0, eval_every=0)))
    assert r.returncode == 0, r.stderr
    r = run_cli("--nproc_per_node", "2", "--master_port", port, "-m", "lynx_core", "train",
                str(write_config(tmp_path / "two.json", out=str(two), max_steps=6, grad_accum=1,
                                 save_every=0, eval_every=0, distributed=distributed)),
                module=("-m", "torch.distributed.run"))
    assert r.returncode == 0, r.stderr[-3000:]
    wa = load_file(str(last_checkpoint(one) / "model.safetensors"))
    wb = load_file(str(last_checkpoint(two) / "model.safetensors"))
    worst = max(float((wa[k] - wb[k]).abs().max() / (wa[k].abs().max() + 1e-12)) for k in wa)
    assert worst <= 1e-6, worst
    h1 = json.loads((last_checkpoint(one) / "state.json").read_text())["loss_history"]
    h2 = json.loads((last_checkpoint(two) / "state.json").read_text())["loss_history"]
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h2], rel=1e-6)
    # The exported adapters are whole (FSDP shards gathered) and equal the checkpoint's weights.
    exported = load_adapters(next((two / "adapters").iterdir()), dtype=torch.float32).state_dict()
    assert set(wb) <= set(exported)
    for k in wb:
        assert torch.allclose(exported[k], wb[k].to(torch.bfloat16).float()), k


def test_tiny_demo_trains_and_writes_official_adapters(tmp_path):
    r = run_cli("train", "--tiny-demo", "--out", str(tmp_path / "demo"), "--max-steps", "60")
    assert r.returncode == 0, r.stderr
    assert "training loss" in r.stdout and "right identity" in r.stdout
    folders = list((tmp_path / "demo" / "adapters").iterdir())
    assert len(folders) == 1
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == ["ip_layers.safetensors", "ref_layers.safetensors", "resampler.safetensors"]
    adapters = load_adapters(folders[0])
    assert adapters.variant == "full"
    assert list((tmp_path / "demo").glob("loss_step_*.png"))


def test_a_dataset_folder_trains_from_the_command_line(tmp_path):
    """Folder -> cache (MTCNN, random ArcFace, tiny encoders) -> training -> official adapters."""
    import numpy as np
    from PIL import Image

    from tests.conftest_face import astronaut, random_arcface_pth

    data = tmp_path / "people"
    (data / "astro" / "id").mkdir(parents=True)
    face = astronaut()
    Image.fromarray(face).save(data / "astro" / "id" / "portrait.png")
    for name, img in (("mirror", face[:, ::-1]), ("crop", face[20:, 10:])):
        Image.fromarray(np.ascontiguousarray(img)).save(data / "astro" / f"{name}.png")
        (data / "astro" / f"{name}.txt").write_text(f"an astronaut, {name}")
    cfg = write_config(tmp_path / "c.json", out=str(tmp_path / "run"), dataset=str(data), vae="tiny",
                       text_encoder="tiny", detector="mtcnn", arcface=str(random_arcface_pth()),
                       max_steps=3, token_budget=512, heldout=0.0, eval_every=0,
                       data={"pixel_area": 128 * 128, "verify_threshold": None})
    r = run_cli("train", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "cache").is_dir()
    assert load_adapters(tmp_path / "run" / "adapters" / "step_000003").variant == "full"
    # An empty dataset folder is refused with its name.
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("train", str(write_config(tmp_path / "d.json", out=str(tmp_path / "run2"), dataset=str(empty),
                                          vae="tiny", text_encoder="tiny", max_steps=3)))
    assert r.returncode == 2 and "error:" in r.stderr and str(empty) in r.stderr


def test_fsdp_resume_equals_straight_fsdp_training(tmp_path):
    """Sharded weights and AdamW moments are gathered into the checkpoint and sharded again on resume."""
    def torchrun(port, *args):
        r = run_cli("--nproc_per_node", "2", "--master_port", port, "-m", "lynx_core", "train", *args,
                    module=("-m", "torch.distributed.run"))
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    straight = write_config(tmp_path / "a.json", out=str(tmp_path / "a"), max_steps=6, distributed="fsdp",
                            save_every=0, eval_every=0)
    split = write_config(tmp_path / "b.json", out=str(tmp_path / "b"), max_steps=6, distributed="fsdp",
                         save_every=0, eval_every=0)
    torchrun("29531", str(straight))
    torchrun("29532", str(split), "--max-steps", "3")
    assert "resumed from" in torchrun("29533", str(split)).stderr
    wa = load_file(str(last_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(last_checkpoint(tmp_path / "b") / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
