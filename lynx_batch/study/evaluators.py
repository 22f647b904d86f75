"""Face-resemblance evaluators of a study: facexlib's ArcFace IR-SE50 and insightface's recognition model.

* ``facexlib_arcface``: what the pack ships and Lynx was trained with: lynx_core.face's detector,
  alignment and IR-SE50, scored by :func:`lynx_core.face.similarity.cosine_per_frame`, the very
  function behind Lynx Face Similarity, so a video's numbers equal that node's.
* ``insightface``: the recognition ``.onnx`` of an insightface pack (antelopev2's glintr100,
  buffalo_l's w600k_r50, or any file given by path), run on onnxruntime without the insightface
  package. Same detector and 5 landmarks, the standard 112x112 ArcFace crop, then the input
  normalisation insightface's ``ArcFaceONNX`` applies: (x - 127.5) / 127.5 on the RGB crop, or
  no scaling (mean 0, std 1) for graphs that normalise inside (one of the first 8 nodes named
  ``Sub``/``_minus`` and one ``Mul``/``_mul``, the MXNet exports such as glintr100).

torch, onnxruntime and lynx_core are imported only when an evaluator is built, so lynx_batch
stays importable (and the report runs) without them.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "EVALUATOR_NAMES", "EvaluatorConfig", "parse_config", "build_evaluators", "find_insightface_recognition",
    "recognition_shape_ok", "file_sha256", "FacexlibArcFace", "InsightFaceRecognition",
]

EVALUATOR_NAMES = ("facexlib_arcface", "insightface")
# Bump when a change of this module changes the numbers: every stored score then counts as stale.
VERSIONS = {"facexlib_arcface": "1", "insightface": "1"}
# Pack order when searching: antelopev2 first (its glintr100 is the identity model InstantID and PuLID use).
PREFERRED_PACKS = ("antelopev2", "buffalo_l")
PREFERRED_RECOGNITION = ("glintr100.onnx", "w600k_r50.onnx", "w600k_mbf.onnx")
# Files of a pack that are never recognition models (opening them would only cost time).
NOT_RECOGNITION = {"det_10g.onnx", "det_2.5g.onnx", "det_500m.onnx", "scrfd_10g_bnkps.onnx", "1k3d68.onnx",
                   "2d106det.onnx", "genderage.onnx"}
_COMMON_KEYS = {"names", "frame_stride", "max_frames", "detector", "models_dirs", "device", "contact_frames"}
# Per-evaluator entries: `facexlib_arcface = true | false | {weights, backend}`, `insightface = true | false |
# "auto" | {model}`; "facexlib" is accepted for facexlib_arcface.
_ALIASES = {"facexlib": "facexlib_arcface", "facexlib_arcface": "facexlib_arcface", "insightface": "insightface"}
_SUB_KEYS = {"facexlib_arcface": {"weights", "backend"}, "insightface": {"model"}}


class EvaluatorError(ValueError):
    """A bad ``evaluators`` table in the study file (the message names the key and the fix)."""


@dataclass
class EvaluatorConfig:
    """The study file's ``evaluators`` table, checked. Paths are absolute."""

    names: list[str] | None = None  # None: facexlib_arcface, plus insightface when a model is found
    required: set[str] = field(default_factory=set)  # asked for explicitly: missing models are errors
    frame_stride: int = 1
    max_frames: int = 0  # 0 = every frame
    detector: str = "auto"
    models_dirs: list[Path] = field(default_factory=list)
    arcface_weights: Path | None = None
    arcface_backend: str = "torch"
    insightface_model: Path | None = None
    device: str | None = None
    contact_frames: int = 6  # frames per video in the report's contact sheet

    def frame_settings(self) -> dict[str, int]:
        return {"frame_stride": self.frame_stride, "max_frames": self.max_frames}


def _int(table: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvaluatorError(f"evaluators.{key}: expected a whole number >= {minimum}, got {value!r}")
    return value


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise EvaluatorError(f"evaluators.{key}: expected a path (a non-empty string), got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _evaluator_entries(table: dict[str, Any]) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for key in list(table):
        if key in _ALIASES:
            name = _ALIASES[key]
            if name in entries:
                raise EvaluatorError(f"evaluators.{key}: {name} is given twice; keep one entry")
            value = table.pop(key)
            if isinstance(value, dict):
                unknown = sorted(set(value) - _SUB_KEYS[name])
                if unknown:
                    raise EvaluatorError(f"evaluators.{key}: unknown key(s) {unknown}; known: {sorted(_SUB_KEYS[name])}")
            elif not (isinstance(value, bool) or (name == "insightface" and value == "auto")):
                allowed = "true, false, \"auto\" or a table" if name == "insightface" else "true, false or a table"
                raise EvaluatorError(f"evaluators.{key}: expected {allowed}, got {value!r}")
            entries[name] = value
    return entries


def parse_config(table: Mapping[str, Any] | None, base_dir: Path) -> EvaluatorConfig:
    """Check the ``evaluators`` table; relative paths are taken from ``base_dir`` (the study file's folder).

    Needs neither torch nor lynx_core, so a study can be checked before anything runs.
    """
    table = dict(table or {})
    entries = _evaluator_entries(table)
    unknown = sorted(set(table) - _COMMON_KEYS)
    if unknown:
        raise EvaluatorError(f"evaluators: unknown key(s) {unknown}; known keys: "
                             f"{sorted(_COMMON_KEYS | set(_ALIASES))}")
    cfg = EvaluatorConfig()
    names = table.get("names")
    if names is not None:
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or any(_ALIASES.get(n) is None for n in names):
            raise EvaluatorError(f"evaluators.names: expected a list drawn from {list(EVALUATOR_NAMES)}, got {names!r}")
        cfg.names = list(dict.fromkeys(_ALIASES[n] for n in names))
        cfg.required = set(cfg.names)
    else:
        # Unlisted: facexlib_arcface runs, insightface runs when a model is found ("auto").
        value = {"facexlib_arcface": True, "insightface": "auto", **entries}
        cfg.names = [n for n in EVALUATOR_NAMES if value[n] is not False] if entries else None
        if cfg.names == []:
            raise EvaluatorError("evaluators: every evaluator is switched off; leave facexlib_arcface on")
        cfg.required = {n for n in EVALUATOR_NAMES if value[n] is not False and value[n] != "auto"}
    cfg.frame_stride = _int(table, "frame_stride", 1, 1)
    cfg.max_frames = _int(table, "max_frames", 0, 0)
    cfg.contact_frames = _int(table, "contact_frames", 6, 0)
    detector = table.get("detector", "auto")
    if not isinstance(detector, str) or not detector.strip():
        raise EvaluatorError(f"evaluators.detector: expected auto, mtcnn or insightface:<pack>, got {detector!r}")
    cfg.detector = detector.strip()
    dirs = table.get("models_dirs", [])
    if isinstance(dirs, str):
        dirs = [dirs]
    if not isinstance(dirs, list):
        raise EvaluatorError(f"evaluators.models_dirs: expected a list of ComfyUI models folders, got {dirs!r}")
    cfg.models_dirs = [_path(d, "models_dirs", base_dir) for d in dirs]
    for d in cfg.models_dirs:
        if not d.is_dir():
            raise EvaluatorError(f"evaluators.models_dirs: {d} is not a folder; give ComfyUI's models folder")
    fx = entries.get("facexlib_arcface") if isinstance(entries.get("facexlib_arcface"), dict) else {}
    weights = fx.get("weights")
    if weights is not None:
        cfg.arcface_weights = _path(weights, "facexlib_arcface.weights", base_dir)
    backend = fx.get("backend", "torch")
    if backend not in ("torch", "onnx"):
        raise EvaluatorError(f"evaluators.facexlib_arcface.backend: expected torch or onnx, got {backend!r}")
    cfg.arcface_backend = backend
    ins = entries.get("insightface") if isinstance(entries.get("insightface"), dict) else {}
    model = ins.get("model")
    if model is not None:
        cfg.insightface_model = _path(model, "insightface.model", base_dir)
        if not cfg.insightface_model.exists():
            raise EvaluatorError(f"evaluators.insightface.model: {cfg.insightface_model} does not exist; give the "
                                 "recognition .onnx (e.g. glintr100.onnx) or its pack folder")
    device = table.get("device")
    if device is not None and not isinstance(device, str):
        raise EvaluatorError(f"evaluators.device: expected cpu, cuda or cuda:<n>, got {device!r}")
    cfg.device = device
    return cfg


# ---- files ---------------------------------------------------------------------------------------

_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (path, size, mtime) for the models read on every job."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# ---- the insightface recognition model -------------------------------------------------------------

def recognition_shape_ok(path: Path, providers: Sequence[Any] | None = None) -> bool:
    """True when the ONNX graph looks like an ArcFace recognition model: one [N, 3, 112, 112] input, one 512-d output."""
    from lynx_core.face.providers import OrtModel

    try:
        model = OrtModel(path, list(providers) if providers else ["CPUExecutionProvider"])
    except Exception as exc:  # a broken or foreign file is simply not the recognition model
        logger.debug("not a recognition model: %s (%s)", path, exc)
        return False
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return False
    shape = list(model.inputs[0].shape)
    out = list(model.outputs[0].shape)
    return len(shape) == 4 and shape[1:] == [3, 112, 112] and len(out) == 2 and out[-1] == 512


def _pack_folders(models_dirs: Sequence[Path]) -> list[tuple[str, Path]]:
    from lynx_core.face.paths import insightface_roots

    found: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for root in insightface_roots(models_dirs):
        if not root.is_dir():
            continue
        try:
            children = sorted((p for p in root.iterdir() if p.is_dir()),
                              key=lambda p: (PREFERRED_PACKS.index(p.name) if p.name in PREFERRED_PACKS
                                             else len(PREFERRED_PACKS), p.name))
        except OSError:
            continue
        for child in children:
            for folder in (child, child / child.name):  # the antelopev2 zip unpacks to antelopev2/antelopev2
                if folder.is_dir() and any(folder.glob("*.onnx")) and str(folder.resolve()) not in seen:
                    seen.add(str(folder.resolve()))
                    found.append((child.name, folder))
                    break
    found.sort(key=lambda t: PREFERRED_PACKS.index(t[0]) if t[0] in PREFERRED_PACKS else len(PREFERRED_PACKS))
    return found


def _recognition_in(folder: Path, providers: Sequence[Any] | None) -> Path | None:
    files = sorted(p for p in folder.glob("*.onnx") if p.is_file())
    order = ([p for n in PREFERRED_RECOGNITION for p in files if p.name == n]
             + [p for p in files if p.name not in PREFERRED_RECOGNITION and p.name not in NOT_RECOGNITION])
    for p in order:
        if recognition_shape_ok(p, providers):
            return p
        logger.info("insightface evaluator: %s is not a recognition model ([N,3,112,112] -> 512); skipped", p)
    return None


def find_insightface_recognition(models_dirs: Sequence[Path], explicit: Path | None = None,
                                 providers: Sequence[Any] | None = None) -> tuple[Path, str] | None:
    """(recognition .onnx, pack name) from ``explicit`` (a file or pack folder) or the packs found; None if none."""
    if explicit is not None:
        if explicit.is_file():
            if not recognition_shape_ok(explicit, providers):
                raise EvaluatorError(f"evaluators.insightface.model: {explicit} is not a face recognition model "
                                     "(needs one [N, 3, 112, 112] input and one 512-d output, like glintr100.onnx "
                                     "or w600k_r50.onnx)")
            return explicit, explicit.parent.name
        for folder in (explicit, explicit / explicit.name):
            found = _recognition_in(folder, providers) if folder.is_dir() else None
            if found is not None:
                return found, explicit.name
        raise EvaluatorError(f"evaluators.insightface.model: no recognition model ([N, 3, 112, 112] -> 512) in "
                             f"{explicit}; give the .onnx file itself")
    for name, folder in _pack_folders(models_dirs):
        found = _recognition_in(folder, providers)
        if found is not None:
            return found, name
    return None


def insightface_normalisation(path: Path) -> tuple[float, float]:
    """(mean, std) as insightface's ArcFaceONNX picks them for this graph."""
    try:
        import onnx
    except ImportError:
        # Without the onnx package the graph's node names cannot be read; the public packs are known.
        guess = (0.0, 1.0) if path.name == "glintr100.onnx" else (127.5, 127.5)
        logger.info("insightface evaluator: the onnx package is missing, so %s's input scaling is taken from its "
                    "name: mean %s, std %s (pip install onnx to read it from the graph)", path.name, *guess)
        return guess
    graph = onnx.load(str(path), load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


# ---- evaluators ----------------------------------------------------------------------------------

class FaceEvaluator:
    """Reference embedding of an identity photo, then a cosine per frame (None: no face in the frame)."""

    name = ""

    def info(self) -> dict[str, Any]:
        """What identifies the numbers: name, version, model file and its sha256, detector, frame settings."""
        raise NotImplementedError

    def reference(self, photo: np.ndarray) -> Any:
        raise NotImplementedError

    def score_frames(self, frames: Sequence[np.ndarray], reference: Any,
                     cancel: Callable[[], None] | None = None) -> list[float | None]:
        raise NotImplementedError


def _analyzer(cfg: EvaluatorConfig):
    from lynx_core.face.analyzer import FaceAnalyzer

    return FaceAnalyzer(detector=cfg.detector, models_dirs=cfg.models_dirs, arcface_path=cfg.arcface_weights,
                        arcface_backend=cfg.arcface_backend, device=cfg.device)


class FacexlibArcFace(FaceEvaluator):
    name = "facexlib_arcface"

    def __init__(self, cfg: EvaluatorConfig, analyzer=None) -> None:
        self.cfg = cfg
        self.analyzer = analyzer if analyzer is not None else _analyzer(cfg)
        encoder = self.analyzer.encoder  # loads the model now: a missing file fails before any job
        model = encoder.onnx_path if encoder.onnx_path is not None else encoder.weights
        self.model_path = Path(model)
        self.model_sha256 = file_sha256(self.model_path)
        self.runtime = encoder.provider

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": VERSIONS[self.name], "model": self.model_path.name,
                "model_path": str(self.model_path), "model_sha256": self.model_sha256,
                "backend": self.cfg.arcface_backend, "detector": self.analyzer.detector.name,
                **self.cfg.frame_settings()}

    def reference(self, photo: np.ndarray):
        # As Lynx Encode Face ID with face_select = largest: the largest face's unit embedding.
        return self.analyzer.encode(photo, select="largest", on_no_face="error").embedding

    def score_frames(self, frames, reference, cancel=None):
        from lynx_core.face.similarity import cosine_per_frame

        return cosine_per_frame(self.analyzer, frames, reference, cancel=cancel)


class InsightFaceRecognition(FaceEvaluator):
    name = "insightface"

    def __init__(self, cfg: EvaluatorConfig, model_path: Path, pack: str, analyzer=None) -> None:
        from lynx_core.face.providers import OrtModel, default_providers

        self.cfg = cfg
        self.analyzer = analyzer if analyzer is not None else _analyzer(cfg)
        self.model_path = Path(model_path)
        self.pack = pack
        self.model = OrtModel(self.model_path, default_providers(cfg.device))
        self.mean, self.std = insightface_normalisation(self.model_path)
        self.model_sha256 = file_sha256(self.model_path)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": VERSIONS[self.name], "model": self.model_path.name,
                "model_path": str(self.model_path), "model_sha256": self.model_sha256, "pack": self.pack,
                "input_mean": self.mean, "input_std": self.std, "detector": self.analyzer.detector.name,
                **self.cfg.frame_settings()}

    def embed(self, crop112: np.ndarray) -> np.ndarray:
        """uint8 RGB [112, 112, 3] aligned crop -> unit 512-d embedding (float64)."""
        # ArcFaceONNX gets BGR pictures and swaps them to RGB in blobFromImages: the net sees RGB.
        x = (crop112.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        out = self.model(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))[0]
        vec = np.asarray(out, dtype=np.float64).reshape(-1)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)

    def _largest_face_embedding(self, image: np.ndarray) -> np.ndarray | None:
        from lynx_core.face.align import align_arcface_112
        from lynx_core.face.analyzer import select_faces
        from lynx_core.face.imageops import to_uint8_rgb

        image = to_uint8_rgb(image)
        faces = self.analyzer.detect(image)
        if not faces:
            return None
        face = faces[select_faces(faces, "largest")[0]]
        return self.embed(align_arcface_112(image, face.kps)[0])

    def reference(self, photo: np.ndarray) -> np.ndarray:
        from lynx_core.face.types import NoFaceError

        emb = self._largest_face_embedding(photo)
        if emb is None:
            raise NoFaceError(f"No face found in the identity photo ({photo.shape[1]}x{photo.shape[0]}).")
        return emb

    def score_frames(self, frames, reference, cancel=None):
        scores: list[float | None] = []
        for frame in frames:
            if cancel is not None:
                cancel()
            emb = self._largest_face_embedding(frame)
            scores.append(None if emb is None else float(np.dot(emb, reference)))
        return scores


def build_evaluators(cfg: EvaluatorConfig, log: Callable[[str], None] = print) -> list[FaceEvaluator]:
    """The evaluators the config asks for; insightface is skipped (and said so) when no model is found."""
    names = cfg.names or list(EVALUATOR_NAMES)
    analyzer = _analyzer(cfg)
    out: list[FaceEvaluator] = []
    if "facexlib_arcface" in names:
        out.append(FacexlibArcFace(cfg, analyzer))
    if "insightface" in names:
        from lynx_core.face.paths import insightface_roots

        found = find_insightface_recognition(cfg.models_dirs, cfg.insightface_model)
        if found is not None:
            out.append(InsightFaceRecognition(cfg, found[0], found[1], analyzer))
        elif "insightface" in cfg.required:
            raise EvaluatorError(
                "evaluators: insightface is asked for, but no insightface recognition model was found. Searched the "
                "pack folders under: " + ", ".join(str(r) for r in insightface_roots(cfg.models_dirs))
                + ". Put antelopev2/ (glintr100.onnx) or buffalo_l/ (w600k_r50.onnx) in models/insightface/models/, "
                "or set evaluators.insightface.model to the .onnx file.")
        else:
            log("scoring: no insightface recognition model (antelopev2 or buffalo_l pack) found; only "
                "facexlib_arcface runs. Set evaluators.insightface.model or evaluators.models_dirs to add it.")
    for ev in out:
        i = ev.info()
        log(f"scoring: evaluator {ev.name} v{i['version']}: {i['model_path']} (sha256 {i['model_sha256'][:12]}...), "
            f"detector {i['detector']}")
    return out
