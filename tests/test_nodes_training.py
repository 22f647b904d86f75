"""The training nodes without ComfyUI: schemas, ComfyUI's MODEL -> the engine, inference mode, cancel/resume,
saving, and the dataset node on a real folder (MTCNN, random ArcFace, stand-in VAE and CLIP)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lynx_core.adapters import load_adapters
from lynx_core.train.synthetic import synthetic_identities, tiny_models
from lynx_core.train.tiny_encoders import TinyTextEncoder, TinyVAE
from lynx_core.train.trainer import InMemorySource
from nodes import comfy_env
from nodes.payloads import AdaptersHandle
from nodes.training import LynxSaveAdapters, LynxTrainAdapters, LynxTrainingDataset
from nodes.training_data import TrainingDataset, trim_padding
from nodes.training_model import TrainingModelError, base_state, engine_model
from nodes.training_run import RunSettings, train_adapters

STEPS = 3


class Patcher:
    """The parts of ComfyUI's ModelPatcher the training nodes read."""

    def __init__(self, dm, patches=None, hooks=None):
        self.model = types.SimpleNamespace(diffusion_model=dm)
        self.patches = patches or {}
        self.hook_patches = hooks or {}


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture()
def comfy_dirs(tmp_path, monkeypatch):
    """folder_paths with input/, output/ and models/lynx under tmp_path."""
    for sub in ("input", "output", "models/lynx"):
        (tmp_path / sub).mkdir(parents=True)
    fp = types.SimpleNamespace(get_input_directory=lambda: str(tmp_path / "input"),
                               get_output_directory=lambda: str(tmp_path / "output"),
                               get_temp_directory=lambda: str(tmp_path / "temp"))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setattr(comfy_env, "model_dirs", lambda name: [tmp_path / "models" / name])
    return tmp_path


def _comfy_like(inference: bool):
    """A tiny Wan DiT and tiny adapters, made the way ComfyUI's loaders make them (optionally in inference mode)."""
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        dm, adapters = tiny_models(seed=0)
        dm = dm.to(torch.float32)
        if inference:  # loaders run under inference_mode: every weight is an inference tensor
            for p in list(dm.parameters()) + list(adapters.parameters()):
                p.data = p.data.clone()
    return dm, adapters


class SyntheticDataset(TrainingDataset):
    def __init__(self):
        samples, _heldout, fixed = synthetic_identities(seed=0)
        source = InMemorySource(samples, set(), fingerprint="synthetic-test")
        source.fixed = fixed
        super().__init__(cache=source, name="synthetic", report="")

    @property
    def fixed(self):
        return self.cache.fixed


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(dataset, dm, adapters, run_name, steps=STEPS, **kw):
    args = dict(mode="full", steps=steps, learning_rate=1e-3, lora_rank=4, token_budget=64, blocks_to_swap=0,
                save_every=0, run_name=run_name, resume="auto", seed=0)
    args.update(kw)
    return LynxTrainAdapters().train(Patcher(dm), dataset, adapters=AdaptersHandle(adapters, "tiny"), **args)


# -- ComfyUI's MODEL -> the engine's WanModel -----------------------------------------------------
def test_engine_model_uses_the_same_tensors():
    dm, _ = _comfy_like(inference=False)
    with torch.inference_mode(False):
        model = engine_model(Patcher(dm))
    theirs = dm.state_dict()
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in theirs), "a weight was copied"
    assert model.config.dim == 64 and model.config.num_layers == 4 and not any(p.requires_grad for p in model.parameters())


def test_inference_weights_are_cloned_and_lora_patches_applied():
    dm, _ = _comfy_like(inference=True)
    key = "blocks.1.self_attn.q.weight"
    seen = []

    def calculate_weight(patches, weight, name):  # comfy.lora.calculate_weight's signature
        seen.append(name)
        return weight + patches[0]

    patcher = Patcher(dm, patches={"diffusion_model." + key: [0.5]})
    with torch.inference_mode(False):
        state = base_state(patcher, calculate_weight=calculate_weight)
    assert seen == ["diffusion_model." + key]
    assert torch.equal(state[key], dm.state_dict()[key] + 0.5)
    assert not any(t.is_inference() for t in state.values())


def test_fp8_weights_are_cast_up_with_their_scale():
    dm, _ = _comfy_like(inference=False)
    w = dm.blocks[0].ffn[0].weight
    fp8 = torch.nn.Parameter(w.detach().to(torch.float8_e4m3fn), requires_grad=False)
    dm.blocks[0].ffn[0].weight = fp8
    dm.blocks[0].ffn[0].register_buffer("scale_weight", torch.tensor(2.0))
    with torch.inference_mode(False):
        model = engine_model(Patcher(dm), dtype=torch.float32)
    assert model.blocks[0].ffn[0].weight.dtype == torch.float32
    assert torch.equal(model.blocks[0].ffn[0].weight, fp8.float() * 2.0)


def test_gguf_and_hooks_are_refused_with_a_message():
    dm, _ = _comfy_like(inference=False)
    with torch.inference_mode(False), pytest.raises(TrainingModelError, match="scheduled LoRA hooks"):
        engine_model(Patcher(dm, hooks={"hook": 1}))

    class GGMLTensor(torch.Tensor):
        pass

    dm.blocks[2].self_attn.k.weight = torch.nn.Parameter(
        dm.blocks[2].self_attn.k.weight.detach().as_subclass(GGMLTensor), requires_grad=False)
    with torch.inference_mode(False), pytest.raises(TrainingModelError, match="GGUF"):
        engine_model(Patcher(dm))


# -- training through the node ---------------------------------------------------------------------
def test_trains_under_comfyuis_inference_mode_and_leaves_the_base_alone(comfy_dirs):
    """ComfyUI runs nodes under torch.inference_mode() with weights its loaders made there."""
    dm, adapters = _comfy_like(inference=True)
    base, start = _snapshot(dm), _snapshot(adapters)
    with torch.inference_mode():
        out = _train(SyntheticDataset(), dm, adapters, "run")
    handle, folder, plot, loss = out["result"]
    (shown,) = out["ui"]["images"]
    assert (comfy_dirs / "temp" / shown["filename"]).is_file()
    # the base is bit-identical, the incoming adapters untouched, the trained ones moved
    assert all(torch.equal(base[k], v) for k, v in dm.state_dict().items())
    assert all(torch.equal(start[k], v) for k, v in adapters.state_dict().items())
    trained = handle.adapters.state_dict()
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k].float(), start[k].float()) for k in start)
    # outputs: the run folder with the export, the plot as an IMAGE, ComfyUI's LOSS_MAP
    assert Path(folder) == comfy_dirs / "output" / "lynx_training" / "run"
    assert (Path(folder) / "adapters" / f"step_{STEPS:06d}" / "ip_layers.safetensors").is_file()
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and 0 <= float(plot.min())
    assert list(loss) == ["loss"] and len(loss["loss"]) == STEPS and all(np.isfinite(loss["loss"]))
    assert isinstance(handle, AdaptersHandle) and handle.variant == "full"


def test_a_fresh_start_and_lora_mode(comfy_dirs):
    dm, adapters = _comfy_like(inference=False)
    out = _train(SyntheticDataset(), dm, adapters, "lora", mode="lora", steps=2)
    handle = out["result"][0]
    assert not any(k.endswith(("lora_A", "lora_B")) for k in handle.adapters.state_dict()), "LoRA not merged"


def test_cancel_saves_a_checkpoint_and_running_again_resumes_exactly(comfy_dirs, monkeypatch):
    dm, adapters = _comfy_like(inference=False)
    data = SyntheticDataset()
    reference = _train(data, dm, adapters, "straight", steps=4)["result"]

    asked = []

    def interrupt_after_two():
        asked.append(1)
        return len(asked) > 2  # fit asks before every step: steps 1 and 2 run, then Cancel

    def throw():
        raise Interrupted("Processing interrupted")

    monkeypatch.setattr(comfy_env, "interrupt_requested", interrupt_after_two)
    monkeypatch.setattr(comfy_env, "throw_if_interrupted", throw)
    with pytest.raises(Interrupted):
        _train(data, dm, adapters, "cancelled", steps=4)
    run = comfy_dirs / "output" / "lynx_training" / "cancelled"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert not (run / "adapters").exists(), "an interrupted run must not look finished"

    monkeypatch.setattr(comfy_env, "interrupt_requested", lambda: False)
    resumed = _train(data, dm, adapters, "cancelled", steps=4)["result"]
    assert resumed[3]["loss"] == reference[3]["loss"]  # the same 4 steps, bit for bit
    ref_sd, res_sd = reference[0].adapters.state_dict(), resumed[0].adapters.state_dict()
    assert all(torch.equal(ref_sd[k], res_sd[k]) for k in ref_sd)
    # queued once more: nothing left to train, the same export is returned
    again = _train(data, dm, adapters, "cancelled", steps=4)["result"]
    assert again[1] == resumed[1] and again[3]["loss"] == reference[3]["loss"]


def test_resume_none_starts_a_new_numbered_run(comfy_dirs):
    dm, adapters = _comfy_like(inference=False)
    data = SyntheticDataset()
    first = _train(data, dm, adapters, "again", steps=1)["result"][1]
    second = _train(data, dm, adapters, "again", steps=1, resume="none")["result"][1]
    assert Path(first).name == "again" and Path(second).name == "again_001"


def test_bad_inputs_name_themselves(comfy_dirs):
    dm, adapters = _comfy_like(inference=False)
    with pytest.raises(ValueError, match="run_name"):
        _train(SyntheticDataset(), dm, adapters, "../escape")
    with pytest.raises(TypeError, match="dataset"):
        LynxTrainAdapters().train(Patcher(dm), "not a dataset", "full", 1, 1e-3, 4, 64, 0, 0, "x", "auto", 0)
    with pytest.raises(ValueError, match="resume"):
        with torch.inference_mode(False):
            train_adapters(Patcher(dm), SyntheticDataset().cache, SyntheticDataset().fixed,
                           RunSettings(run_dir=comfy_dirs / "r", resume="sometimes"))


# -- saving ----------------------------------------------------------------------------------------
def test_save_writes_the_official_layout_and_never_overwrites(comfy_dirs):
    _, adapters = _comfy_like(inference=True)
    handle = AdaptersHandle(adapters, "tiny")
    with torch.inference_mode():
        (path,) = LynxSaveAdapters().save(handle, "mine", "fp32")["result"]
    assert Path(path) == comfy_dirs / "models" / "lynx" / "mine"
    assert {p.name for p in Path(path).iterdir()} == {"resampler.safetensors", "ip_layers.safetensors",
                                                      "ref_layers.safetensors"}
    loaded = load_adapters(Path(path), dtype=torch.float32)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in adapters.state_dict().items())
    with pytest.raises(ValueError, match="already exists"):
        LynxSaveAdapters().save(handle, "mine", "bf16")
    with pytest.raises(ValueError, match="name"):
        LynxSaveAdapters().save(handle, "a/b", "bf16")
    # Load Lynx Adapters lists it without a restart
    from nodes.loaders import adapter_choices
    assert "mine" in adapter_choices().adapters


# -- the dataset node ------------------------------------------------------------------------------
class StandInVAE:
    """ComfyUI's VAE interface: encode(IMAGE-like [F, H, W, 3] float 0..1) -> [1, 16, F', h, w]."""

    def __init__(self):
        self.tiny, self.calls = TinyVAE(0), 0

    def encode(self, pixels):
        self.calls += 1
        return self.tiny((pixels * 255).round().to(torch.uint8))[None]


class StandInCLIP:
    """ComfyUI's CLIP interface; pads to 512 rows with zeros, as its UMT5 does."""

    def __init__(self):
        self.text = TinyTextEncoder(dim=32)

    def tokenize(self, text):
        return {"umt5xxl": text}

    def encode_from_tokens(self, tokens):
        t = self.text(tokens["umt5xxl"])
        return torch.cat([t, torch.zeros(512 - t.shape[0], t.shape[1])])[None]


def test_trim_padding():
    t = torch.cat([torch.ones(3, 4), torch.zeros(5, 4)])[None]
    assert trim_padding(t).shape == (3, 4) and trim_padding(torch.zeros(1, 6, 4)).shape == (1, 4)


def test_dataset_node_builds_reuses_reports_and_trains(comfy_dirs, monkeypatch):
    from lynx_core.face import FaceAnalyzer
    from lynx_core.train.media import resize_center_crop
    from tests.conftest_face import astronaut, cat, models_root_with_arcface

    root = comfy_dirs / "input" / "lynx_datasets" / "mine" / "anna"  # <dataset>/<person>/{id/, targets}
    (root / "id").mkdir(parents=True)
    face = resize_center_crop(astronaut()[None], 256, 256)[0]
    Image.fromarray(face).save(root / "id" / "front.png")
    Image.fromarray(np.ascontiguousarray(face[:, ::-1])).save(root / "mirrored.png")
    (root / "mirrored.txt").write_text("a woman, mirrored", encoding="utf-8")
    Image.fromarray(resize_center_crop(cat()[None], 256, 256)[0]).save(root / "cat.png")
    (root / "cat.txt").write_text("a cat", encoding="utf-8")
    assert LynxTrainingDataset.INPUT_TYPES()["required"]["dataset"][0] == ["mine"]

    analyzer = FaceAnalyzer("mtcnn", models_dirs=[models_root_with_arcface()], device="cpu")
    monkeypatch.setattr(LynxTrainingDataset, "analyzer", lambda self, detector: analyzer)
    vae, clip = StandInVAE(), StandInCLIP()
    node = LynxTrainingDataset()
    args = ("mine", vae, clip, "mtcnn", 256 * 256, 1, 1, 0.0)
    with torch.inference_mode():
        built = node.build(*args)
    dataset, report, preview = built["result"]
    (shown,) = built["ui"]["images"]  # the preview on the node, from ComfyUI's temp folder
    assert (comfy_dirs / "temp" / shown["filename"]).is_file() and shown["type"] == "temp"
    assert [e.key for e in dataset.cache.entries] == ["anna/mirrored.png#anna/id/front.png"]
    assert "anna/cat.png" in report and "no face" in report  # the skipped target, with its reason
    assert preview.shape == (1, 160, 320, 3)
    sample = dataset.cache.sample(0)
    assert torch.equal(sample.text, clip.text("a woman, mirrored"))  # the 512-row padding trimmed off
    assert (dataset.cache.folder == comfy_dirs / "output" / "lynx_training" / "cache" / "mine")
    calls = vae.calls
    with torch.inference_mode():
        again, report2, _ = node.build(*args)["result"]
    assert vae.calls == calls and report2.startswith("reused")
    assert again.fingerprint == dataset.fingerprint

    dm, adapters = _comfy_like(inference=True)
    with torch.inference_mode():
        out = _train(again, dm, adapters, "from_folder", steps=2, token_budget=256)
    assert len(out["result"][3]["loss"]) == 2


def test_dataset_node_errors_name_the_input(comfy_dirs):
    node = LynxTrainingDataset()
    with pytest.raises(ValueError, match="dataset: no dataset folder"):
        node.build("(no folders in input/lynx_datasets)", StandInVAE(), StandInCLIP(), "mtcnn", 65536, 1, 1, 0.0)
    with pytest.raises(ValueError, match="dataset:.*does not exist"):
        node.build("missing", StandInVAE(), StandInCLIP(), "mtcnn", 65536, 1, 1, 0.0)
    (comfy_dirs / "input" / "lynx_datasets" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="clip"):
        node.build("x", StandInVAE(), None, "mtcnn", 65536, 1, 1, 0.0)


def test_gpu_memory_plan_choice_from_budgets():
    """blocks_to_swap = -1 takes the first plan that fits; a count is honoured as given."""
    from nodes.training_run import choose_plan

    dm, adapters = _comfy_like(inference=False)
    budgets = dict(device_total_bytes=80 * 2**30, device_free_bytes=80 * 2**30)
    auto = choose_plan(dm, adapters, RunSettings(run_dir=Path("x"), mode="full", token_budget=256), "cuda", **budgets)
    assert auto.blocks_to_swap == 0 and not auto.fp8_base and auto.mode == "full"
    fixed = choose_plan(dm, adapters, RunSettings(run_dir=Path("x"), mode="lora", token_budget=256, blocks_to_swap=2),
                        "cuda", **budgets)
    assert fixed.blocks_to_swap == 2 and fixed.mode == "lora"


def test_cancel_raised_by_comfyuis_progress_hook_still_saves(comfy_dirs, monkeypatch):
    """Inside ComfyUI the progress bar's hook raises InterruptProcessingException (and clears the
    interrupt flag) on Cancel: the node must still stop with a checkpoint and raise it afterwards."""
    class InterruptProcessingException(Exception):
        pass

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            if value == 2:
                raise InterruptProcessingException()

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    dm, adapters = _comfy_like(inference=False)
    with pytest.raises(InterruptProcessingException):
        _train(SyntheticDataset(), dm, adapters, "hooked", steps=5)
    run = comfy_dirs / "output" / "lynx_training" / "hooked"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]


def test_x0_preview_reaches_comfyuis_progress_preview(comfy_dirs, monkeypatch):
    """Every preview_every steps the node sends (JPEG, image, size) through ComfyUI's progress bar:
    the predicted x0 beside the target."""
    seen = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            if preview is not None:
                seen.append((value, preview))

    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    dm, adapters = _comfy_like(inference=False)
    _train(SyntheticDataset(), dm, adapters, "previewed", steps=4, preview_every=2)
    assert [v for v, _ in seen] == [2, 4]
    fmt, image, size = seen[-1][1]
    assert fmt == "JPEG" and size == 512
    w, h = image.size
    assert w == 2 * h or w > h  # prediction | target side by side
    left = np.asarray(image)[:, : w // 2].astype(float)
    right = np.asarray(image)[:, w // 2:].astype(float)
    assert left.shape == right.shape and np.abs(left - right).mean() > 0  # a prediction, not the target copied


def test_trainer_preview_recovers_x0_from_the_velocity():
    """x0 = x_t - sigma * v: with the true velocity the preview is exactly the target."""
    from lynx_core.train.loss import noise_sample, sample_generator
    x0 = torch.randn(16, 1, 4, 4)
    n = noise_sample(x0, 0.75, sample_generator(0, 1))
    assert torch.allclose(n.x_t - 0.75 * n.target, x0, atol=1e-6)


def test_resume_from_a_listed_state_continues_it_in_a_new_folder(comfy_dirs):
    from nodes.training import saved_states
    dm, adapters = _comfy_like(inference=False)
    data = SyntheticDataset()
    straight = _train(data, dm, adapters, "branch", steps=4, save_every=2)["result"]
    states = saved_states()
    assert "branch/step_000002" in states and "branch/step_000004" in states
    assert "branch/step_000002" in LynxTrainAdapters.INPUT_TYPES()["required"]["resume"][0]
    again = _train(data, dm, adapters, "branch", steps=4, resume="branch/step_000002")["result"]
    assert Path(again[1]).name == "branch_001"  # the original run is left as it is
    assert again[3]["loss"] == straight[3]["loss"]  # steps 3 and 4 retrained from step 2, bit for bit
    a, b = straight[0].adapters.state_dict(), again[0].adapters.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_token_budget_auto(comfy_dirs):
    dm, adapters = _comfy_like(inference=False)
    out = _train(SyntheticDataset(), dm, adapters, "auto_budget", steps=1, token_budget=0)["result"]
    import json
    state = json.loads((Path(out[1]) / "checkpoints" / "step_000001" / "state.json").read_text())
    assert state["config"]["token_budget"] == 33_600  # the CPU's choice; on CUDA the largest plan that fits
