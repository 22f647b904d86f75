"""Training checkpoints: bit-identical resume, RNG restore, atomic never-overwriting layout, pruning, compatibility."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from lynx_core.train import checkpoint as ckpt
from lynx_core.train.checkpoint import (
    CheckpointError,
    capture_rng_states,
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _step(model, opt, gen: torch.Generator) -> float:
    # The batch comes from the global torch RNG and a named generator, so resume must restore both.
    x = torch.randn(5, 6) + torch.randn(5, 6, generator=gen)
    y = torch.randn(5, 3, generator=gen) * random.random() + float(np.random.rand())
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99)),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True),
}


def _seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bit_identical(tmp_path, name):
    make_opt = OPTIMIZERS[name]
    # 6 steps straight.
    model = _model(0)
    opt = make_opt(model.parameters())
    gen = _seed_all(123)
    straight = [_step(model, opt, gen) for _ in range(6)]
    want = {k: v.clone() for k, v in model.state_dict().items()}

    # 3 steps, save, then a fresh model/optimizer/RNG, load, 3 more.
    model = _model(0)
    opt = make_opt(model.parameters())
    gen = _seed_all(123)
    history = [{"step": i + 1, "loss": _step(model, opt, gen)} for i in range(3)]
    folder = save_checkpoint(tmp_path, 3, model.state_dict(), opt.state_dict(),
                             rng_states=capture_rng_states({"data": gen}),
                             data_cursor={"epoch": 0, "index": 3}, loss_history=history)

    model = _model(99)  # different weights, so a missed restore shows
    opt = make_opt(model.parameters())
    gen = _seed_all(777)
    state = load_checkpoint(folder)
    model.load_state_dict(state.trainable)
    opt.load_state_dict(state.optimizer_state)
    restore_rng_states(state.rng_states, {"data": gen})
    resumed = [h["loss"] for h in state.loss_history] + [_step(model, opt, gen) for _ in range(3)]

    assert state.step == 3 and state.data_cursor == {"epoch": 0, "index": 3}
    assert resumed == straight  # exact float equality, every step
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_optimizer_state_keeps_types(tmp_path):
    model = _model(0)
    opt = OPTIMIZERS["adamw"](model.parameters())
    _step(model, opt, _seed_all(0))
    folder = save_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict())
    loaded = load_checkpoint(folder).optimizer_state
    original = opt.state_dict()
    assert loaded["param_groups"][0]["betas"] == (0.9, 0.99)  # a tuple again, not a list
    assert set(loaded["state"]) == set(original["state"]) == {0, 1, 2, 3}  # int keys again
    for i, s in original["state"].items():
        for k, v in s.items():
            assert torch.equal(loaded["state"][i][k], v) and loaded["state"][i][k].dtype == v.dtype


def test_rng_restore_gives_the_same_draws():
    gen = torch.Generator().manual_seed(5)
    _seed_all(11)
    torch.randn(3, generator=gen)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    states = capture_rng_states({"g": gen})
    first = (random.random(), np.random.randn(4).tolist(), torch.rand(4).tolist(), torch.rand(4, generator=gen).tolist())
    # Through JSON and back, as a checkpoint stores them.
    tensors: dict = {}
    encoded = json.loads(json.dumps(ckpt._encode(states, None, "rng")))
    restore_rng_states(ckpt._decode(encoded, tensors), {"g": gen})
    again = (random.random(), np.random.randn(4).tolist(), torch.rand(4).tolist(), torch.rand(4, generator=gen).tolist())
    assert again == first
    with pytest.raises(CheckpointError, match="no state for generator 'other'"):
        restore_rng_states(states, {"other": torch.Generator()})


def _save(tmp_path, step, **kw):
    t = {"w": torch.full((2, 2), float(step))}
    return save_checkpoint(tmp_path, step, t, {"state": {}, "param_groups": []}, **kw)


def test_layout_and_json_only(tmp_path):
    folder = _save(tmp_path, 10, config={"lr": 1e-5, "model": {"dim": 64}}, fingerprints={"base": "abc"},
                   loss_history=[{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 0.25}])
    assert folder == tmp_path / "checkpoints" / "step_000010"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000010"]  # no temp left behind
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 10 and state["config"]["model"]["dim"] == 64
    loaded = load_checkpoint(folder)
    assert math.isnan(loaded.loss_history[0]["loss"]) and loaded.loss_history[1] == {"step": 2, "loss": 0.25}
    assert torch.equal(loaded.trainable["w"], torch.full((2, 2), 10.0))


def test_never_overwrites(tmp_path):
    folder = _save(tmp_path, 5)
    with pytest.raises(CheckpointError, match="never overwritten"):
        save_checkpoint(tmp_path, 5, {"w": torch.zeros(2, 2)}, {"state": {}, "param_groups": []})
    assert torch.equal(load_checkpoint(folder).trainable["w"], torch.full((2, 2), 5.0))


def test_crash_while_saving_leaves_no_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = ckpt.save_file
    calls = []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the model file is written, then the process "dies" on the optimizer file
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    monkeypatch.setattr(ckpt, "save_file", real)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_000001"


def test_latest_ignores_temp_and_incomplete_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_000009-123-abcd").mkdir()            # a save killed with SIGKILL
    (root / ".tmp-step_000009-123-abcd" / "model.safetensors").write_bytes(b"x")
    broken = root / "step_000007"                            # copied by hand, without its state.json
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"x")
    (broken / "optimizer.safetensors").write_bytes(b"x")
    (root / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step_000002"
    with pytest.raises(CheckpointError, match="state.json missing"):
        load_checkpoint(broken)
    # A later save of the crashed step clears its left-over temp folder.
    _save(tmp_path, 9)
    assert not (root / ".tmp-step_000009-123-abcd").exists()
    assert latest_checkpoint(tmp_path) == root / "step_000009"


def test_keep_last_prunes_oldest_but_never_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    _save(tmp_path, 6, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000006"]
    with pytest.raises(CheckpointError, match="keep_last"):
        _save(tmp_path, 7, keep_last=0)


def test_bad_inputs_name_themselves(tmp_path):
    with pytest.raises(CheckpointError, match="config must be JSON-able"):
        _save(tmp_path, 1, config={"path": object()})
    with pytest.raises(CheckpointError, match=r"optimizer_state.*set"):
        save_checkpoint(tmp_path, 1, {}, {"state": {0: {"x": {1, 2}}}, "param_groups": []})
    with pytest.raises(CheckpointError, match="non-negative integer"):
        _save(tmp_path, -1)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


CONFIG = {"base_model": "wan-tiny", "mode": "lora", "lora_rank": 16, "max_steps": 100, "save_every": 10,
          "model": {"dim": 64, "layers": 4}}
MUST = ["base_model", "mode", "lora_rank", "model.dim", "model.layers"]


def test_check_compatible_allows_harmless_changes(tmp_path):
    state = load_checkpoint(_save(tmp_path, 1, config=CONFIG, fingerprints={"base": "f1", "dataset": "d1"}))
    new = dict(CONFIG, max_steps=500, save_every=50)
    changed = check_compatible(state, new, {"base": "f1", "dataset": "d1"}, MUST)
    assert changed == ["max_steps: 100 -> 500", "save_every: 10 -> 50"]


def test_check_compatible_names_the_setting_and_the_fix(tmp_path):
    state = load_checkpoint(_save(tmp_path, 1, config=CONFIG, fingerprints={"base": "f1"}))
    new = dict(CONFIG, lora_rank=32, model={"dim": 128, "layers": 4})
    with pytest.raises(CheckpointError) as err:
        check_compatible(state, new, {"base": "f1"}, MUST)
    msg = str(err.value)
    assert "lora_rank: checkpoint 16, this run 32" in msg and "model.dim: checkpoint 64, this run 128" in msg
    assert "--out" in msg and "max_steps" not in msg
    with pytest.raises(CheckpointError, match="fingerprint base: checkpoint 'f1', this run 'f2'"):
        check_compatible(state, CONFIG, {"base": "f2"}, MUST)
    with pytest.raises(CheckpointError, match="mode: checkpoint 'lora', this run <not set>"):
        check_compatible(state, {k: v for k, v in CONFIG.items() if k != "mode"}, {"base": "f1"}, MUST)
    # Only the listed fingerprints matter when a list is given.
    assert check_compatible(state, CONFIG, {"base": "f1", "dataset": "new"}, MUST, fingerprint_keys=["base"]) == []


def test_cuda_rng_state_of_the_current_device_round_trips(tmp_path, monkeypatch):
    # No GPU in CI: stand in for torch.cuda and check what is captured, stored and put back.
    fake = torch.arange(16, dtype=torch.uint8)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: fake.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state.clone(), device)))
    folder = _save(tmp_path, 1, rng_states=capture_rng_states())
    restore_rng_states(load_checkpoint(folder).rng_states)
    assert len(calls) == 1 and calls[0][1] == 1 and torch.equal(calls[0][0], fake)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine without cuda:1
    restore_rng_states(load_checkpoint(folder).rng_states)
    assert len(calls) == 1
