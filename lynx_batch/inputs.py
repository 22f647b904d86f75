"""The batch's inputs: prompts (a text or CSV file, or the command line), face photos, and the
jobs made by pairing them."""
import csv
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QueueError
from .textfile import read_text

log = logging.getLogger("lynx.queue")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
CSV_COLUMNS = ("prompt", "negative", "seed", "face")


@dataclass
class Job:
    index: int
    prompt: str
    negative: str | None = None
    seed: int | None = None
    face: Path | None = None

    @property
    def label(self) -> str:
        face = self.face.stem if self.face else "noface"
        return f"{self.index:03d}_{slug(face, 24)}"


def slug(text: str, limit: int) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (s[:limit] or "x").rstrip("-.")


def load_prompts(path: Path, flag: str = "--prompts") -> list[dict[str, Any]]:
    """Read prompts from a ``.csv`` (columns prompt[,negative,seed,face]) or a text file (one per line).

    Text files skip blank lines and lines starting with ``#``. In a CSV the ``face`` column is a
    path (absolute, or relative to the CSV file) or a file name inside the ``--faces`` folder.
    The file may be UTF-8 (with or without BOM) or UTF-16/32 with a BOM.
    """
    if not path.is_file():
        raise QueueError(f"{flag}: {path} does not exist; give a .txt file (one prompt per line) or a .csv file")
    text = read_text(path, flag)
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        # newline="" lets the csv module keep line breaks inside quoted prompts.
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "prompt" not in fields:
            raise QueueError(f"{flag}: {path} has no 'prompt' column; the first line must be a header such as "
                             "'prompt,negative,seed,face'")
        unknown = set(fields) - set(CSV_COLUMNS)
        if unknown:
            log.warning("%s: ignoring unknown CSV columns %s", flag, sorted(unknown))
        for raw in reader:
            line_no = reader.line_num
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get("prompt"):
                continue
            entry: dict[str, Any] = {"prompt": row["prompt"], "line": line_no}
            if row.get("negative"):
                entry["negative"] = row["negative"]
            if row.get("seed"):
                try:
                    entry["seed"] = int(row["seed"])
                except ValueError:
                    raise QueueError(f"{flag}: {path} line {line_no}: seed {row['seed']!r} is not an "
                                     "integer") from None
            if row.get("face"):
                entry["face"] = row["face"]
            rows.append(entry)
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append({"prompt": line, "line": line_no})
    if not rows:
        raise QueueError(f"{flag}: {path} contains no prompt")
    return rows


def find_faces(path: Path | None) -> list[Path]:
    """Photos given by ``--faces``: one image file, or every image in a folder (sorted, not recursive)."""
    if path is None:
        return []
    if path.is_file():
        return [path]
    if path.is_dir():
        photos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not photos:
            raise QueueError(f"--faces: the folder {path} has no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return photos
    raise QueueError(f"--faces: {path} does not exist; give a photo or a folder of photos")


def make_jobs(prompts: list[dict[str, Any]], faces: list[Path], prompts_file: Path | None = None,
              faces_arg: Path | None = None, seed: int | None = None) -> list[Job]:
    """Pair prompts with photos: a row's own ``face`` wins, otherwise every photo runs every prompt."""
    jobs: list[Job] = []
    for row in prompts:
        if row.get("face"):
            photos = [_resolve_face(row["face"], prompts_file, faces_arg, row.get("line"))]
        elif faces:
            photos = list(faces)
        else:
            photos = [None]
        for photo in photos:
            jobs.append(Job(index=len(jobs) + 1, prompt=row["prompt"], negative=row.get("negative"),
                            seed=row.get("seed", seed), face=photo))
    return jobs


def _resolve_face(value: str, prompts_file: Path | None, faces_arg: Path | None, line: int | None) -> Path:
    candidates = [Path(value).expanduser()]
    if prompts_file is not None:
        candidates.append(prompts_file.parent / value)
    if faces_arg is not None:
        candidates.append((faces_arg if faces_arg.is_dir() else faces_arg.parent) / value)
    for c in candidates:
        if c.is_file():
            return c
    raise QueueError(f"--prompts line {line}: face photo {value!r} not found (looked at "
                     f"{', '.join(str(c) for c in candidates)})")
