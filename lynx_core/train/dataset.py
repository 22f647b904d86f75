"""Scanning a training dataset folder into (target, identity photos, caption) items.

Layout (docs/training-data.md)::

    dataset/
      anna/                  one folder per person
        id/                  identity photos of anna (images only)
          front.jpg
        clip1.mp4            targets: images or videos anywhere in anna/ outside id/
        clip1.txt            same-stem caption
        beach.png
        beach.txt
      metadata.jsonl         optional: explicit pairs; when present it replaces the folder scan

``metadata.jsonl`` holds one JSON object per line::

    {"target": "anna/clip1.mp4", "identity": ["anna/id/front.jpg"], "caption": "...", "heldout": false}

``target`` and ``identity`` (a path or a list of paths) are relative to the dataset folder;
``caption`` is optional (else the target's same-stem ``.txt``); ``heldout`` optional (forces the
pair into or out of the held-out split).

Every target is paired with every one of its identity photos: each pair is one training entry.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .media import is_image, is_media

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "TargetItem", "DatasetScan", "scan_dataset", "IDENTITY_FOLDER", "METADATA_FILE"]

IDENTITY_FOLDER = "id"
METADATA_FILE = "metadata.jsonl"
_METADATA_FIELDS = {"target", "identity", "caption", "heldout"}
_SHOW = 20  # names listed in an error before "... and N more"


class DatasetError(ValueError):
    """The dataset folder cannot be used as it is; the message names the files and the fix."""


@dataclass(frozen=True)
class TargetItem:
    """One target file and the identity photos it is paired with (paths relative to the dataset root)."""

    path: str
    caption: str
    person: str
    identities: tuple[str, ...]
    heldout: bool | None = None  # None: the split decides


@dataclass
class DatasetScan:
    root: Path
    targets: list[TargetItem]
    source: str  # "folders" or "metadata.jsonl"

    @property
    def identity_photos(self) -> list[str]:
        return sorted({i for t in self.targets for i in t.identities})

    @property
    def pairs(self) -> list[tuple[TargetItem, str]]:
        return [(t, i) for t in self.targets for i in t.identities]


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_caption(target: Path) -> str | None:
    txt = target.with_suffix(".txt")
    if not txt.is_file():
        return None
    return txt.read_text(encoding="utf-8").strip()


def _caption_error(missing: list[str]) -> DatasetError:
    return DatasetError(
        f"{len(missing)} target(s) have no caption: {_listing(missing)}. Write a same-stem .txt next to each "
        "(clip1.mp4 -> clip1.txt) or a \"caption\" in metadata.jsonl, or set allow_empty_captions = true to "
        "train them with the empty prompt.")


def _scan_folders(root: Path, allow_empty_captions: bool) -> list[TargetItem]:
    people = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(_rel(p, root) for p in root.iterdir() if p.is_file() and is_media(p))
    if stray:
        logger.warning("ignored %d media file(s) directly in %s (%s): put them in a person folder.",
                       len(stray), root, _listing(stray))
    targets: list[TargetItem] = []
    no_id: list[str] = []
    missing: list[str] = []
    for person in people:
        id_dir = person / IDENTITY_FOLDER
        ids = sorted(_rel(p, root) for p in id_dir.rglob("*")
                     if p.is_file() and is_image(p) and _visible(p, root)) if id_dir.is_dir() else []
        files = sorted(p for p in person.rglob("*") if p.is_file() and is_media(p) and _visible(p, root)
                       and id_dir not in p.parents)
        if not files:
            if ids:
                logger.warning("person folder %s has identity photos but no targets; nothing to train there.",
                               _rel(person, root))
            continue
        if not ids:
            no_id.append(_rel(person, root))
            continue
        for f in files:
            caption = _read_caption(f)
            if caption is None:
                if not allow_empty_captions:
                    missing.append(_rel(f, root))
                    continue
                caption = ""
            targets.append(TargetItem(_rel(f, root), caption, person.name, tuple(ids)))
    if no_id:
        raise DatasetError(
            f"{len(no_id)} person folder(s) in {root} have targets but no identity photos: {_listing(no_id)}. "
            f"Put one or more face photos of that person in <person>/{IDENTITY_FOLDER}/ (for example "
            f"{no_id[0]}/{IDENTITY_FOLDER}/front.jpg).")
    if missing:
        raise _caption_error(missing)
    return targets


def _metadata_paths(value: object, line_no: int, field: str, root: Path) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise DatasetError(f"{METADATA_FILE} line {line_no}: \"{field}\" must be a path or a non-empty list of "
                           "paths relative to the dataset folder.")
    out = []
    for v in items:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise DatasetError(f"{METADATA_FILE} line {line_no}: {field} path {v!r} must be relative to the dataset "
                               "folder and stay inside it (no absolute paths, no '..').")
        if not (root / p).is_file():
            raise DatasetError(f"{METADATA_FILE} line {line_no}: {field} {v!r} does not exist in {root}; fix the "
                               "path or remove the line.")
        out.append(p.as_posix())
    return out


def _scan_metadata(root: Path, allow_empty_captions: bool) -> list[TargetItem]:
    path = root / METADATA_FILE
    targets: list[TargetItem] = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {line_no} is not valid JSON ({exc.msg}); each line must be one object "
                               'like {"target": "anna/clip1.mp4", "identity": ["anna/id/front.jpg"]}.') from exc
        if not isinstance(rec, dict):
            raise DatasetError(f"{path} line {line_no} must be a JSON object, not {type(rec).__name__}.")
        unknown = sorted(set(rec) - _METADATA_FIELDS)
        if unknown:
            raise DatasetError(f"{path} line {line_no}: unknown field(s) {unknown}; allowed: "
                               f"{sorted(_METADATA_FIELDS)}.")
        for field in ("target", "identity"):
            if field not in rec:
                raise DatasetError(f"{path} line {line_no}: \"{field}\" is missing.")
        target = _metadata_paths(rec["target"], line_no, "target", root)
        if len(target) != 1:
            raise DatasetError(f"{path} line {line_no}: \"target\" must be one path.")
        tpath = target[0]
        if not is_media(root / tpath):
            raise DatasetError(f"{path} line {line_no}: target {tpath!r} is not an image or video file.")
        ids = _metadata_paths(rec["identity"], line_no, "identity", root)
        bad = [i for i in ids if not is_image(root / i)]
        if bad:
            raise DatasetError(f"{path} line {line_no}: identity photo(s) {bad} are not images.")
        if tpath in seen:
            raise DatasetError(f"{path} lines {seen[tpath]} and {line_no} both name target {tpath!r}; list all its "
                               "identity photos on one line.")
        seen[tpath] = line_no
        caption = rec.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DatasetError(f"{path} line {line_no}: \"caption\" must be a string.")
        if caption is None:
            caption = _read_caption(root / tpath)
        if caption is None:
            if not allow_empty_captions:
                missing.append(tpath)
                continue
            caption = ""
        heldout = rec.get("heldout")
        if heldout is not None and not isinstance(heldout, bool):
            raise DatasetError(f"{path} line {line_no}: \"heldout\" must be true or false.")
        person = Path(tpath).parts[0] if len(Path(tpath).parts) > 1 else ""
        targets.append(TargetItem(tpath, caption.strip(), person, tuple(dict.fromkeys(ids)), heldout))
    if missing:
        raise _caption_error(missing)
    return targets


def scan_dataset(root: str | Path, allow_empty_captions: bool = False) -> DatasetScan:
    """List the dataset's targets with their captions and identity photos; raise DatasetError on bad layout."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; give the folder that holds one sub-folder per "
                           "person (see docs/training-data.md).")
    root = root.resolve()
    if (root / METADATA_FILE).is_file():
        targets, source = _scan_metadata(root, allow_empty_captions), METADATA_FILE
    else:
        targets, source = _scan_folders(root, allow_empty_captions), "folders"
    if not targets:
        raise DatasetError(
            f"dataset {root} is empty: no targets found ({source}). Expected one folder per person with face "
            f"photos in <person>/{IDENTITY_FOLDER}/ and targets (images/videos with same-stem .txt captions) "
            f"next to it, or a {METADATA_FILE} listing pairs.")
    logger.info("dataset %s: %d target(s), %d identity photo(s), %d pair(s) (from %s)", root, len(targets),
                len({i for t in targets for i in t.identities}), sum(len(t.identities) for t in targets), source)
    return DatasetScan(root, targets, source)
