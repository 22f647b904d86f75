"""The training graph: LynxTrainingDataset -> LynxTrainAdapters -> LynxSaveAdapters (Lynx/training).

Thin nodes over lynx_core.train: the dataset cache is built with ComfyUI's VAE, CLIP and the pack's
face pipeline (nodes/training_data.py), the base is ComfyUI's own Wan model handed to the engine
without copies (nodes/training_model.py), the run is the engine's Trainer (nodes/training_run.py).
"""
from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from lynx_core.train.cache import CacheSettings, TrainCache
from lynx_core.train.dataset import scan_dataset
from lynx_core.train.export import export_adapters
from lynx_core.train.plot import loss_plot_png

from . import comfy_env
from .face import DETECTORS, _DETECTOR_TIP, make_analyzer
from .loaders import auto_dtype
from .payloads import LYNX_ADAPTERS, AdaptersHandle
from .training_data import (LYNX_DATASET, ProgressCounter, TrainingDataset, comfy_progress_bar, dataset_choices,
                            dataset_report, folder_stamp, make_encoders, preview_grid, resolve_dataset)
from .training_run import RESUME, RunSettings, train_adapters

log = logging.getLogger(__name__)

LOSS_MAP = "LOSS_MAP"  # ComfyUI's own type (comfy_extras/nodes_train.py): {"loss": [float, ...]}
MODES = ["auto", "full", "lora", "id_only", "ref_only"]
VARIANTS = ["full", "lite"]
TRAINING_FOLDER = "lynx_training"


def saved_states() -> list[str]:
    """Every complete checkpoint under output/lynx_training/, as "<run>/step_NNNNNN" (newest first)."""
    from lynx_core.train.checkpoint import list_checkpoints
    root = training_root()
    if not root.is_dir():
        return []
    found = []
    for run in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "cache"):
        found += [f"{run.name}/{c.name}" for c in list_checkpoints(run)]
    return sorted(found, key=lambda s: (s.split("/")[0], s), reverse=True)


def training_root() -> Path:
    try:
        return comfy_env.output_directory() / TRAINING_FOLDER
    except ImportError:
        return Path(TRAINING_FOLDER)


def _check_name(value: str, input_name: str) -> str:
    name = (value or "").strip()
    if not name or Path(name).name != name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"{input_name}: {value!r} must be a plain folder name (letters, digits, - and _), "
                         "no slashes")
    return name


def compute_device() -> torch.device:
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cpu")
    return mm.get_torch_device()


def free_comfy_memory() -> None:
    """Unload every model ComfyUI holds on the GPU (the training base included: the engine moves
    what it needs itself) so the run's plan sees the free memory."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.unload_all_models()
    mm.soft_empty_cache()


def release_training_memory() -> None:
    """Give the trainer's GPU memory back to ComfyUI's allocator after a run."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.soft_empty_cache()


def ui_image(image: torch.Tensor, prefix: str) -> list[dict]:
    """Write IMAGE [1, H, W, 3] to ComfyUI's temp folder and describe it as a node preview ([] without ComfyUI)."""
    from PIL import Image

    try:
        folder = comfy_env.temp_directory()
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}.png"
    arr = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    Image.fromarray(arr).save(folder / name)
    return [{"filename": name, "subfolder": "", "type": "temp"}]


# ------------------------------------------------------------------------------------------------
class LynxTrainingDataset:
    DESCRIPTION = ("Encodes a training dataset folder (input/lynx_datasets/<name>: identity photos, target videos "
                   "or images with .txt captions, see docs/training-data.md) once with the VAE, the UMT5 text "
                   "encoder and the face pipeline, into a cache under output/lynx_training/cache/<name>; later runs "
                   "reuse it while the files, the encoders and the settings are unchanged.")
    CATEGORY = "Lynx/training"
    RETURN_TYPES = (LYNX_DATASET, "STRING", "IMAGE")
    RETURN_NAMES = ("dataset", "report", "preview")
    OUTPUT_TOOLTIPS = ("The encoded dataset, for Lynx Train Adapters.",
                       "Counts, resolution buckets and every skipped file with its reason.",
                       "Per pair: the aligned identity face beside the target's first frame.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": (dataset_choices(), {"tooltip": "A folder under ComfyUI/input/lynx_datasets/ (press R after "
                                                       "adding one). Layout: docs/training-data.md."}),
            "vae": ("VAE", {"tooltip": "The Wan 2.1 VAE (wan_2.1_vae.safetensors)."}),
            "clip": ("CLIP", {"tooltip": "The Wan UMT5-XXL text encoder (Load CLIP, type wan)."}),
            "detector": (DETECTORS, {"default": "auto", "tooltip": _DETECTOR_TIP}),
            "max_pixels": ("INT", {"default": 480 * 832, "min": 256, "max": 1280 * 1280, "step": 256,
                                   "tooltip": "Pixel area each target is resized to (aspect kept, sides multiples "
                                              "of 16). 399360 = 480x832, the paper's size."}),
            "max_frames": ("INT", {"default": 81, "min": 1, "max": 241, "step": 4,
                                   "tooltip": "Frames per video (4k+1: 1, 5, ..., 81); longer videos use their first ones."}),
            "frame_stride": ("INT", {"default": 1, "min": 1, "max": 16,
                                     "tooltip": "Take every n-th frame of a video (2 halves the frame rate)."}),
            "verify_threshold": ("FLOAT", {"default": 0.4, "min": -1.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "ArcFace similarity the identity photo must reach with the target's "
                                                      "face; pairs below are skipped (listed in the report). -1 = off."}),
        }, "optional": {
            "heldout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.5, "step": 0.01,
                                  "tooltip": "Fraction of targets kept out of training for the fixed-timestep "
                                             "evaluation loss (0 = none)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, dataset, **_):
        try:
            return folder_stamp(resolve_dataset(dataset))
        except ValueError:
            return f"unresolved|{dataset}"

    def build(self, dataset, vae, clip, detector, max_pixels, max_frames, frame_stride, verify_threshold,
              heldout=0.0):
        folder = resolve_dataset(dataset)
        if vae is None or not hasattr(vae, "encode"):
            raise ValueError("vae: connect the Wan 2.1 VAE (Load VAE)")
        if clip is None or not hasattr(clip, "tokenize"):
            raise ValueError("clip: connect the Wan UMT5 text encoder (Load CLIP, type wan)")
        settings = CacheSettings(pixel_area=int(max_pixels), max_frames=int(max_frames),
                                 frame_stride=int(frame_stride), heldout=float(heldout),
                                 verify_threshold=None if verify_threshold <= -1.0 else float(verify_threshold))
        scan = scan_dataset(folder, settings.allow_empty_captions)
        total = 1 + len(scan.identity_photos) + len(scan.targets)
        counter = ProgressCounter(total, comfy_progress_bar(total))
        face = self.analyzer(detector)
        encoders = make_encoders(vae, clip, face, counter)
        cache_dir = training_root() / "cache" / _check_name(dataset, "dataset")
        with torch.inference_mode(False):
            cache = TrainCache.build(folder, cache_dir, encoders, settings)
        counter.finish()
        for path, reason in cache.dropped:
            log.warning("Lynx Training Dataset: skipped %s: %s", path, reason)
        report = dataset_report(cache, reused=counter.done == 0)
        log.info("Lynx Training Dataset:\n%s", report)
        preview = preview_grid(cache, folder)
        return {"ui": {"images": ui_image(preview, "lynx_dataset_preview")},
                "result": (TrainingDataset(cache=cache, name=dataset, report=report), report, preview)}

    def analyzer(self, detector: str):
        return make_analyzer(detector)


# ------------------------------------------------------------------------------------------------
class _StepReporter:
    """Progress bar per optimizer step, the loss and step rate in the log and the node's text."""

    def __init__(self, total: int, node_id=None):
        self.total = total
        self.node_id = node_id
        self.interrupt: BaseException | None = None
        self.last_preview = None
        self.t0 = time.perf_counter()
        self.first = None
        try:
            import comfy.utils
            self.bar = comfy.utils.ProgressBar(total)
        except ImportError:
            self.bar = None

    def __call__(self, record: dict) -> None:
        step = int(record["step"])
        if self.first is None:
            self.first = step - 1
        rate = (step - self.first) / max(1e-9, time.perf_counter() - self.t0)
        text = f"step {step}/{self.total}  loss {record['loss']:.4f}  {rate:.2f} steps/s"
        self._text(text)
        if self.bar is not None:
            try:
                self.bar.update_absolute(step, self.total)
            except Exception as exc:
                # ComfyUI's progress hook raises the interrupt (and clears the flag) on Cancel: keep
                # it, so the trainer stops after this step with a checkpoint and it is raised after.
                if type(exc).__name__ != "InterruptProcessingException":
                    raise
                self.interrupt = exc

    def preview(self, step: int, image) -> None:
        """Show the x0 preview on the node through ComfyUI's progress preview."""
        self.last_preview = image
        if self.bar is not None:
            try:
                self.bar.update_absolute(step, self.total, ("JPEG", image, 512))
            except Exception as exc:
                if type(exc).__name__ != "InterruptProcessingException":
                    raise
                self.interrupt = exc

    def should_stop(self) -> bool:
        return self.interrupt is not None or comfy_env.interrupt_requested()

    def _text(self, text: str) -> None:
        log.debug("Lynx Train Adapters: %s", text)
        if self.node_id is None:
            return
        try:
            from server import PromptServer
            PromptServer.instance.send_progress_text(text, self.node_id)
        except Exception:  # older ComfyUI without progress text, or no server: the log has it
            pass


def plot_image(history: list[dict], eval_history: list[dict], path: Path | None) -> torch.Tensor:
    """IMAGE [1, H, W, 3] of the loss plot (the engine's PNG, or drawn here when it wrote none)."""
    from PIL import Image

    if path is None or not Path(path).is_file():
        if not history:
            return torch.ones(1, 64, 64, 3)
        path = training_root() / ".loss_preview.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        loss_plot_png(history, path, eval_history=eval_history)
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).to(torch.float32).div(255.0).unsqueeze(0)


class LynxTrainAdapters:
    DESCRIPTION = ("Fine-tunes the Lynx adapters on a dataset from Lynx Training Dataset against the connected, frozen "
                   "Wan model. Progress and loss per step; Cancel saves a resumable state and Run again continues "
                   "it. The result goes to output/lynx_training/<run_name>/ and to the adapters output.")
    CATEGORY = "Lynx/training"
    OUTPUT_NODE = True
    RETURN_TYPES = (LYNX_ADAPTERS, "STRING", "IMAGE", LOSS_MAP)
    RETURN_NAMES = ("adapters", "folder", "loss_plot", "loss")
    OUTPUT_TOOLTIPS = ("The trained adapters (LoRA merged), for Lynx Sampler and Lynx Save Adapters.",
                       "The run folder (checkpoints, exported adapters, loss plot).",
                       "Training loss, its moving average and the held-out loss.",
                       "The loss per step in the form ComfyUI's Loss Graph node reads.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Wan2.1-T2V-14B from Load Diffusion Model (bf16 or fp8; LoRA loaders are "
                                           "baked in). GGUF and scheduled LoRA hooks are refused. Never modified."}),
            "dataset": (LYNX_DATASET, {"tooltip": "From Lynx Training Dataset."}),
            "mode": (MODES, {"default": "auto",
                             "tooltip": "full: every adapter weight (Lynx-full needs ~68 GB for it); lora: low-rank "
                                        "updates of the key/value projections + resampler; id_only / ref_only: one "
                                        "adapter. auto: full when it fits in 60 % of the GPU, else lora."}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000,
                              "tooltip": "Optimizer steps to train to (a resumed run continues to this step)."}),
            "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-1, "step": 1e-6, "round": False,
                                        "tooltip": "AdamW learning rate (the paper: 1e-5)."}),
            "lora_rank": ("INT", {"default": 64, "min": 1, "max": 1024, "tooltip": "Rank of the LoRA updates (mode lora)."}),
            "token_budget": ("INT", {"default": 33_600, "min": 0, "max": 1_000_000, "step": 16,
                                     "tooltip": "Patch tokens per packed step (the paper: 33.6k). An 81-frame 480x832 "
                                                "video is 32760 tokens; lower it on small GPUs and use shorter targets. "
                                                "0 = auto: the largest budget whose memory plan fits the free VRAM."}),
            "blocks_to_swap": ("INT", {"default": -1, "min": -1, "max": 64,
                                       "tooltip": "Wan blocks streamed from RAM per step on a GPU: -1 auto (from free "
                                                  "VRAM), 0 all resident (80 GB+), 40 = all (24 GB)."}),
            "save_every": ("INT", {"default": 500, "min": 0, "max": 1_000_000,
                                   "tooltip": "Checkpoint every N steps (and at the end, and on Cancel); 0 = only then."}),
            "run_name": ("STRING", {"default": "lynx_run",
                                    "tooltip": "Folder under output/lynx_training/ for this run."}),
            "resume": (list(RESUME) + saved_states(), {"default": "auto",
                                      "tooltip": "auto: continue the run folder's newest checkpoint (after Cancel); "
                                                 "none: start over in a new numbered folder; <run>/step_N: continue "
                                                 "that saved state in a new numbered folder."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                             "tooltip": "Every random draw (noise, timesteps, dropout, data order) comes from it."}),
        }, "optional": {
            "adapters": (LYNX_ADAPTERS, {"tooltip": "Adapters to start from (Load Lynx Adapters). Not connected: a "
                                                    "fresh initialisation of the variant below."}),
            "variant": (VARIANTS, {"default": "full", "tooltip": "For a fresh start only: Lynx full or lite."}),
            "preview_every": ("INT", {"default": 25, "min": 0, "max": 100000,
                                      "tooltip": "Every N steps show the x0 the model predicts beside the target "
                                                 "(one cheap forward, latent colours); 0 = off."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, model, dataset, mode, steps, learning_rate, lora_rank, token_budget, blocks_to_swap,
              save_every, run_name, resume, seed, adapters=None, variant="full", preview_every=25,
              unique_id=None):
        if not isinstance(dataset, TrainingDataset):
            raise TypeError("dataset: connect the dataset output of Lynx Training Dataset")
        if adapters is not None and not isinstance(adapters, AdaptersHandle):
            raise TypeError("adapters: connect the output of Load Lynx Adapters (or leave it unconnected)")
        if mode not in MODES:
            raise ValueError(f"mode: unknown choice {mode!r}; use one of {MODES}")
        if variant not in VARIANTS:
            raise ValueError(f"variant: unknown choice {variant!r}; use full or lite")
        name = _check_name(run_name, "run_name")
        settings = RunSettings(run_dir=training_root() / name, mode=mode, steps=int(steps),
                               learning_rate=float(learning_rate), lora_rank=int(lora_rank),
                               token_budget=int(token_budget), blocks_to_swap=int(blocks_to_swap),
                               save_every=int(save_every), resume=resume, seed=int(seed), variant=variant,
                               eval_every=100 if dataset.has_heldout else 0)
        free_comfy_memory()
        reporter = _StepReporter(int(steps), unique_id)
        outcome = train_adapters(model, dataset.cache, dataset.fixed, settings,
                                 adapters=adapters.adapters if adapters is not None else None,
                                 device=compute_device(), should_stop=reporter.should_stop, on_step=reporter,
                                 preview_every=int(preview_every), on_preview=reporter.preview)
        if outcome.stopped:
            log.info("Lynx Train Adapters: cancelled at step %d; Run again to continue (resume = auto)",
                     outcome.trainer.step)
            if reporter.interrupt is not None:
                raise reporter.interrupt
            comfy_env.throw_if_interrupted()
            raise RuntimeError("training stopped before its last step without an interrupt")  # not reached in ComfyUI
        trained = outcome.adapters.to(dtype=auto_dtype())
        release_training_memory()
        source = f"trained:{name}@{outcome.trainer.step}"
        image = plot_image(outcome.history, outcome.trainer.eval_history, outcome.plot_path)
        loss = {"loss": [float(r["loss"]) for r in outcome.history]}
        folder = str(outcome.export_dir.parent.parent) if outcome.export_dir else str(settings.run_dir)
        return {"ui": {"images": ui_image(image, "lynx_loss_plot")},
                "result": (AdaptersHandle(adapters=trained, source=source), folder, image, loss)}


# ------------------------------------------------------------------------------------------------
class LynxSaveAdapters:
    DESCRIPTION = ("Writes adapters to models/lynx/<name>/ in the official layout (resampler / ip_layers "
                   "[/ ref_layers].safetensors, bf16). Never overwrites: an existing name is an error. Load Lynx "
                   "Adapters lists the folder after a refresh (R).")
    CATEGORY = "Lynx/training"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("folder",)
    OUTPUT_TOOLTIPS = ("Where the adapters were written.",)
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapters": (LYNX_ADAPTERS, {"tooltip": "From Lynx Train Adapters (or Load Lynx Adapters)."}),
            "name": ("STRING", {"default": "lynx_trained",
                                "tooltip": "Folder name under models/lynx/; must not exist yet."}),
            "dtype": (["bf16", "fp16", "fp32"], {"default": "bf16", "tooltip": "Storage dtype (the official files are bf16)."}),
        }}

    def save(self, adapters, name, dtype="bf16"):
        if not isinstance(adapters, AdaptersHandle):
            raise TypeError("adapters: connect Lynx Train Adapters or Load Lynx Adapters")
        folder = _check_name(name, "name")
        roots = comfy_env.model_dirs("lynx")
        if not roots:
            raise ValueError("name: there is no models/lynx folder to save into; create ComfyUI/models/lynx")
        target = roots[0] / folder
        if target.exists():
            raise ValueError(f"name: {target} already exists; saved adapters never overwrite anything. Choose another "
                             "name or delete the old folder.")
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        with torch.inference_mode(False):
            path = export_adapters(adapters.adapters, target, dtype=torch_dtype,
                                   metadata={"source": adapters.source, "saved_by": "LynxSaveAdapters"})
        log.info("Lynx Save Adapters: %s", path)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}
