"""Write a new file atomically and never over an existing one.

The data goes to a hidden temporary file in the same folder, which is then hard-linked to the
final name: the link fails when the name exists (so nothing is ever replaced, even by a second
tool writing at the same moment) and a reader never sees half a file. Where the file system
has no hard links, the name is claimed with an exclusive create and the full file is moved onto
that empty placeholder.
"""
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def numbered_like_copies(name: str) -> Iterator[str]:
    """name.ext, name (1).ext, name (2).ext, ... (how file managers number copies)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    yield name
    n = 1
    while True:
        yield f"{stem} ({n}){suffix}"
        n += 1


def numbered_with_counter(name: str) -> Iterator[str]:
    """report.json, report_0001.json, report_0002.json, ... (sorts in run order)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    yield name
    n = 1
    while True:
        yield f"{stem}_{n:04d}{suffix}"
        n += 1


def write_new_file(folder: Path, name: str, data: bytes,
                   names: Callable[[str], Iterator[str]] = numbered_like_copies) -> Path:
    """Write ``data`` under the first free name that ``names(name)`` yields; returns the path."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lynx-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for candidate in names(name):
            path = folder / candidate
            if path.exists():
                continue
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue  # taken in the meantime: try the next name
            except OSError:
                pass  # no hard links on this file system (FAT, some network shares)
            # No hard links here: claim the name, then move the finished file onto the claim.
            try:
                open(path, "xb").close()
            except FileExistsError:
                continue
            os.replace(tmp, path)
            return path
        raise AssertionError("unreachable: the name generator is endless")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (replacing it) through a temporary file in the same folder, fsync
    and a rename, so a reader or a crash sees the old file or the new one, never half of one.
    For files the tool owns and updates (records, scores); outputs use :func:`write_new_file`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
