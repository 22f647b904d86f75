"""Training checkpoints: trainable weights, optimizer state, RNG states, data cursor, config, history.

Layout (one folder per save, never rewritten)::

    OUT/checkpoints/step_000010/model.safetensors      trainable tensors
    OUT/checkpoints/step_000010/optimizer.safetensors  every tensor of the optimizer state_dict
    OUT/checkpoints/step_000010/state.json             everything else (JSON, never a pickle)

A checkpoint is written into a hidden temporary folder next to its final place, every file is
fsynced, and the folder is renamed at the end: a crash or Ctrl-C at any moment leaves either the
complete checkpoint or a temporary folder that ``latest_checkpoint`` ignores. Resuming restores the
optimizer state tensor for tensor and the RNG states draw for draw, so the continued run equals
an uninterrupted one bit for bit.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import fsync_dir

logger = logging.getLogger(__name__)

FORMAT = "lynx-train-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
CHECKPOINTS_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_TMP_PREFIX = ".tmp-"
_DELETE_PREFIX = ".del-"

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, read or resumed from; the message says what to do."""


@dataclass
class TrainState:
    """Everything ``save_checkpoint`` wrote, read back (tensors on the CPU)."""

    step: int
    trainable: dict[str, Tensor]
    optimizer_state: dict[str, Any]  # a torch optimizer state_dict, ready for optimizer.load_state_dict
    rng_states: dict[str, Any]       # as from capture_rng_states; give it to restore_rng_states
    data_cursor: dict[str, Any]
    config: dict[str, Any]
    fingerprints: dict[str, Any]
    loss_history: list[dict[str, Any]]
    folder: Path
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ tagged JSON
# Optimizer state_dicts hold tensors, int-keyed dicts and tuples (AdamW's betas); JSON has none of
# those. Tensors go to safetensors under a generated name; the tree keeps a reference to them.
_T_TENSOR = "__tensor__"
_T_TUPLE = "__tuple__"
_T_ITEMS = "__items__"
_T_BYTES = "__uint8__"
_TAGS = (_T_TENSOR, _T_TUPLE, _T_ITEMS, _T_BYTES)


def _encode(obj: Any, tensors: Optional[dict[str, Tensor]], where: str) -> Any:
    """JSON-able tree; tensors are moved into ``tensors`` (or, with ``tensors=None``, inlined as uint8 bytes)."""
    if isinstance(obj, Tensor):
        if tensors is None:
            if obj.dtype != torch.uint8:
                raise CheckpointError(f"{where}: only uint8 tensors (RNG states) can be stored in state.json")
            return {_T_BYTES: base64.b64encode(obj.detach().cpu().contiguous().numpy().tobytes()).decode("ascii")}
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {_T_TENSOR: name}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj  # json writes inf/nan as Infinity/NaN and reads them back; repr round-trips exactly
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return [_encode(x, tensors, where) for x in obj.tolist()]
    if isinstance(obj, tuple):
        return {_T_TUPLE: [_encode(x, tensors, where) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors, where) for x in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {_T_ITEMS: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    raise CheckpointError(
        f"{where} holds a {type(obj).__name__} ({obj!r:.80}), which a checkpoint cannot store without a pickle; "
        f"keep it to tensors, numbers, strings, lists, tuples and dicts"
    )


def _decode(obj: Any, tensors: Optional[Mapping[str, Tensor]]) -> Any:
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == _T_TENSOR:
            if tensors is None or value not in tensors:
                raise CheckpointError(f"optimizer state refers to tensor {value!r} which is not in {OPTIMIZER_FILE}")
            return tensors[value]
        if tag == _T_TUPLE:
            return tuple(_decode(x, tensors) for x in value)
        if tag == _T_ITEMS:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value}
        if tag == _T_BYTES:
            return torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8).clone()
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _check_jsonable(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name} must be JSON-able (dicts, lists, strings, numbers) for a checkpoint: {exc}") from None


# ------------------------------------------------------------------------------ RNG states
def capture_rng_states(generators: Optional[Mapping[str, torch.Generator]] = None) -> dict[str, Any]:
    """Python ``random``, numpy's global RNG, torch CPU, the current CUDA device (once CUDA is in use), named generators."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": _cuda_state(),
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        if not isinstance(gen, torch.Generator):
            raise CheckpointError(f"generator {name!r} is a {type(gen).__name__}, not a torch.Generator")
        states["generators"][name] = gen.get_state()
    return states


def _cuda_state() -> Optional[dict[str, Any]]:
    # Only the current device, and only once CUDA is in use: get_rng_state_all() would create a
    # context (hundreds of MB) on every visible GPU, including the other DDP ranks' GPUs. Before
    # CUDA is initialised no CUDA draw has happened, so there is nothing to restore.
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    index = torch.cuda.current_device()
    return {"device": index, "state": torch.cuda.get_rng_state(index)}


def restore_rng_states(states: Mapping[str, Any], generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    """Put back what ``capture_rng_states`` took; every named generator must be in ``states``."""
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(states["torch_cpu"])
    cuda = states.get("torch_cuda")
    if cuda is not None:
        index = int(cuda["device"])
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            torch.cuda.set_rng_state(cuda["state"], device=index)
        else:
            logger.warning("the checkpoint holds the CUDA RNG state of cuda:%d, which is not visible now; CUDA "
                           "draws will differ from the uninterrupted run", index)
    saved = states.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"the checkpoint has no state for generator {name!r} (it has {sorted(saved)}); "
                                  f"it was written by another trainer version: start a new run with --out a new folder")
        gen.set_state(saved[name])


# ------------------------------------------------------------------------------ files
def _fsync_file(path: Path) -> None:
    with open(path, "r+b") as fh:
        os.fsync(fh.fileno())




def _cpu_tensors(tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """Detached contiguous CPU tensors; tensors that share memory are cloned (safetensors refuses shared storage)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{what}[{key!r}] is a {type(t).__name__}, not a tensor")
        if t.is_meta:
            raise CheckpointError(f"{what}[{key!r}] is on the meta device and holds no data")
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if t.numel() and (storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone()  # a view into a bigger or already-listed buffer
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[key] = t
    return out


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, allow_nan=True)
        fh.flush()
        os.fsync(fh.fileno())


def step_folder_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    folder: PathLike,
    step: int,
    trainable: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any],
    rng_states: Optional[Mapping[str, Any]] = None,
    data_cursor: Optional[Mapping[str, Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
    fingerprints: Optional[Mapping[str, Any]] = None,
    loss_history: Optional[Sequence[Mapping[str, Any]]] = None,
    keep_last: Optional[int] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``folder/checkpoints/step_NNNNNN/`` atomically and return its path.

    ``folder`` is the run's output folder. ``optimizer_state`` is ``optimizer.state_dict()`` of any
    torch optimizer. ``rng_states`` defaults to ``capture_rng_states()`` (pass your own to include
    named generators). ``keep_last`` prunes the oldest complete checkpoints beyond N (never the one
    just written). An existing checkpoint of the same step is never overwritten.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(f"keep_last must be a positive integer (or unset to keep every checkpoint), got {keep_last!r}")
    data_cursor = dict(data_cursor or {})
    config = dict(config or {})
    fingerprints = dict(fingerprints or {})
    loss_history = [dict(x) for x in (loss_history or [])]
    extra = dict(extra or {})
    for name, value in (("data_cursor", data_cursor), ("config", config), ("fingerprints", fingerprints),
                        ("loss_history", loss_history), ("extra", extra)):
        _check_jsonable(name, value)
    if rng_states is None:
        rng_states = capture_rng_states()

    root = Path(folder) / CHECKPOINTS_DIR
    final = root / step_folder_name(step)
    if final.exists():
        raise CheckpointError(
            f"checkpoint {final} already exists and is never overwritten; resume from it, or write this run "
            f"to another --out folder"
        )
    model = _cpu_tensors(trainable, "trainable")
    opt_tensors: dict[str, Tensor] = {}
    opt_tree = _encode(dict(optimizer_state), opt_tensors, "optimizer_state")
    opt_tensors = _cpu_tensors(opt_tensors, "optimizer_state")
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "optimizer": opt_tree,
        "rng_states": _encode(dict(rng_states), None, "rng_states"),
        "data_cursor": data_cursor,
        "config": config,
        "fingerprints": fingerprints,
        "loss_history": loss_history,
        "extra": extra,
    }

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(model, str(tmp / MODEL_FILE), metadata={"format": "pt", "lynx.checkpoint_step": str(step)})
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            _fsync_file(tmp / name)
        _write_json(tmp / STATE_FILE, state)  # last: a folder with state.json was fully written
        fsync_dir(tmp)
        if final.exists():  # another process raced us to this step
            raise CheckpointError(f"checkpoint {final} appeared while saving; it is never overwritten")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    logger.info("checkpoint step %d written to %s", step, final)
    if keep_last is not None:
        prune_checkpoints(folder, keep_last, protect=final)
    return final


def _remove_stale_temps(root: Path, step: int) -> None:
    """Temp folders of this step are left-overs of a crashed save of the same step (the run went back to an older checkpoint)."""
    for p in root.glob(f"{_TMP_PREFIX}{step_folder_name(step)}-*"):
        logger.info("removing the unfinished checkpoint %s left by an interrupted save", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f"{_DELETE_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def is_complete(path: PathLike) -> bool:
    """A finished checkpoint folder: the right name, all three files, and a readable state.json of this format."""
    path = Path(path)
    if not _STEP_DIR.match(path.name) or not path.is_dir():
        return False
    if not all((path / n).is_file() for n in CHECKPOINT_FILES):
        return False
    try:
        with open(path / STATE_FILE, encoding="utf-8") as fh:
            head = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and head.get("format") == FORMAT


def list_checkpoints(out_dir: PathLike) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest step first (temporary/incomplete folders are skipped)."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m is None:
            continue
        if is_complete(p):
            found.append((int(m.group(1)), p))
        else:
            logger.warning("ignoring the incomplete checkpoint folder %s", p)
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def prune_checkpoints(out_dir: PathLike, keep_last: int, protect: Optional[Path] = None) -> list[Path]:
    """Delete the oldest complete checkpoints so ``keep_last`` remain; the newest and ``protect`` are always kept."""
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be at least 1, got {keep_last}")
    found = list_checkpoints(out_dir)
    keep = set(found[-keep_last:])
    if protect is not None:
        keep.add(Path(protect))
    removed = []
    for p in found:
        if p in keep:
            continue
        # Renamed first, so a crash mid-delete never leaves a half-deleted folder under a step_ name.
        doomed = p.with_name(f"{_DELETE_PREFIX}{p.name}-{uuid.uuid4().hex[:8]}")
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(p)
        logger.info("removed old checkpoint %s (keep_last=%d)", p, keep_last)
    return removed


def load_checkpoint(folder: PathLike) -> TrainState:
    """Read a checkpoint folder written by ``save_checkpoint`` (tensors on the CPU)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass a folder such as OUT/checkpoints/step_000010")
    missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a complete checkpoint ({', '.join(missing)} missing); it was interrupted while "
            f"being written or copied: resume from an older checkpoint (latest_checkpoint skips such folders)"
        )
    try:
        with open(folder / STATE_FILE, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / STATE_FILE} is not readable JSON ({exc}); resume from an older checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not a Lynx training checkpoint (state.json has no format {FORMAT!r})")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{folder} was written by a newer checkpoint format (version {state['version']}, this code reads "
            f"{VERSION}); update ComfyUI-Lynx to resume it"
        )
    try:
        trainable = load_file(str(folder / MODEL_FILE))
        opt_tensors = load_file(str(folder / OPTIMIZER_FILE))
    except Exception as exc:  # safetensors raises its own error type for corrupt data
        raise CheckpointError(f"{folder}: the tensor files cannot be read ({exc}); resume from an older checkpoint") from None
    return TrainState(
        step=int(state["step"]),
        trainable=trainable,
        optimizer_state=_decode(state["optimizer"], opt_tensors),
        rng_states=_decode(state["rng_states"], None),
        data_cursor=state.get("data_cursor", {}),
        config=state.get("config", {}),
        fingerprints=state.get("fingerprints", {}),
        loss_history=state.get("loss_history", []),
        folder=folder,
        extra=state.get("extra", {}),
    )


# ------------------------------------------------------------------------------ compatibility
_ABSENT = object()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    # JSON turns tuples into lists; compare through the same encoding.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _show(v: Any) -> str:
    return "<not set>" if v is _ABSENT else repr(v)


def check_compatible(
    state: TrainState,
    config: Mapping[str, Any],
    fingerprints: Mapping[str, Any],
    must_match: Sequence[str],
    fingerprint_keys: Optional[Sequence[str]] = None,
) -> list[str]:
    """Refuse to resume ``state`` under a config or base model it was not trained with.

    ``must_match`` lists the config settings (dotted paths into nested dicts, e.g. ``"model.dim"``)
    that must be equal; other differences (max_steps, log/save intervals...) are harmless and are
    returned as readable lines for the log. ``fingerprint_keys`` lists the fingerprints that must
    be equal (default: every fingerprint either side has). Raises ``CheckpointError`` naming each
    differing setting with its old and new value, and the fix.
    """
    problems = []
    for key in must_match:
        old, new = _lookup(state.config, key), _lookup(config, key)
        if old is _ABSENT and new is _ABSENT:
            continue
        if old is _ABSENT or new is _ABSENT or not _same(old, new):
            problems.append(f"setting {key}: checkpoint {_show(old)}, this run {_show(new)}")
    keys = list(fingerprint_keys) if fingerprint_keys is not None else sorted(set(state.fingerprints) | set(fingerprints))
    for key in keys:
        old, new = state.fingerprints.get(key, _ABSENT), fingerprints.get(key, _ABSENT)
        if old is _ABSENT or new is _ABSENT or not _same(old, new):
            problems.append(f"fingerprint {key}: checkpoint {_show(old)}, this run {_show(new)}")
    if problems:
        raise CheckpointError(
            f"cannot resume from {state.folder}: it was trained with another base model or config:\n  "
            + "\n  ".join(problems)
            + "\nEither run with the checkpoint's settings (its config is in state.json), or start a new run "
              "with --out pointing to a new folder"
        )
    strict = set(must_match)
    harmless = []
    for key in sorted(set(_flatten(state.config)) | set(_flatten(config))):
        if key in strict or any(key.startswith(k + ".") for k in strict):
            continue
        old, new = _lookup(state.config, key), _lookup(config, key)
        if old is _ABSENT or new is _ABSENT or not _same(old, new):
            harmless.append(f"{key}: {_show(old)} -> {_show(new)}")
    for line in harmless:
        logger.info("resuming with a changed setting %s", line)
    return harmless


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
