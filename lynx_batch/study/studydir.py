"""The study folder: study.json (written once), one record per finished job, the downloads, the run
records, and a lock so two runs never work in the same folder.

    <dir>/study.json              the expanded study
    <dir>/workflow.json           the API workflow the study runs (before the per-job values)
    <dir>/jobs/<job_id>.json      one per ended job (done or failed); a retry's record replaces a
                                  failed one, which is kept in jobs/superseded/
    <dir>/videos/<job_id>/...     the downloaded outputs (never overwritten)
    <dir>/runs/run.json, run_0001.json ...   what each run did
"""
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from ..files import numbered_with_counter, replace_atomically, write_new_file
from .studyfile import Study, StudyError

STUDY_JSON = "study.json"
COMPARED_KEYS = ("name", "workflow_sha256", "targets", "settings", "subjects", "prompts", "seeds", "repeats",
                 "evaluators")


def utc_iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def prepare(study: Study, folder: Path, force_new: bool, now: float) -> None:
    """Make the folder, then write study.json (a new study) or check that it holds this study."""
    if folder.exists() and not folder.is_dir():
        raise StudyError(f"--out: {folder} is a file; give a folder for the study (it is made if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for sub in ("jobs", "videos", "runs"):
            (folder / sub).mkdir(exist_ok=True)
    except OSError as e:
        raise StudyError(f"--out: cannot make {folder} ({e.strerror or e}); give a folder you can write to") from None
    path = folder / STUDY_JSON
    new = study.to_json()
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise StudyError(f"--out: {path} cannot be read ({e}); use a new --out folder") from None
        differ = [k for k in COMPARED_KEYS if old.get(k) != new.get(k)]
        if differ and not force_new:
            raise StudyError(f"--out: {folder} holds another study ({', '.join(differ)} differ from "
                             f"{study.study_file.name}); use a new --out folder, or --force-new to move the "
                             f"old results into {folder}/superseded-<time>/ and start this study there")
        if not differ:
            return  # the same study: this run resumes it
        _set_aside(folder, now)
        for sub in ("jobs", "videos", "runs"):
            (folder / sub).mkdir(exist_ok=True)
    write_new_file(folder, STUDY_JSON, _json_bytes(new))
    write_new_file(folder, "workflow.json", _json_bytes(study.workflow), numbered_with_counter)


def _set_aside(folder: Path, now: float) -> Path:
    """--force-new: the old study's files move into superseded-<time>/ (nothing is deleted)."""
    stamp = utc_iso(now).replace(":", "").replace("-", "")
    dest = folder / f"superseded-{stamp}"
    n = 1
    while dest.exists():
        dest = folder / f"superseded-{stamp}-{n}"
        n += 1
    dest.mkdir()
    for name in (STUDY_JSON, "workflow.json", "jobs", "videos", "runs", "scores", "report"):
        if (folder / name).exists():
            os.replace(folder / name, dest / name)
    return dest


def read_record(folder: Path, job_id: str) -> dict[str, Any] | None:
    path = folder / "jobs" / f"{job_id}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: the job runs again and its new record replaces this one
    return data if isinstance(data, dict) else None


def is_done(folder: Path, record: dict[str, Any] | None) -> bool:
    """Done, with every listed video still there (a deleted video makes the job run again)."""
    if not record or record.get("status") != "done":
        return False
    videos = record.get("videos") or []
    return bool(videos) and all((folder / v).is_file() for v in videos)


def write_record(folder: Path, record: dict[str, Any]) -> Path:
    """Write jobs/<job_id>.json atomically; a record it replaces is kept in jobs/superseded/."""
    jobs = folder / "jobs"
    path = jobs / f"{record['job_id']}.json"
    if path.exists():
        old = jobs / "superseded"
        old.mkdir(exist_ok=True)
        write_new_file(old, path.name, path.read_bytes(), numbered_with_counter)
    replace_atomically(path, _json_bytes(record))
    return path


def write_run_record(folder: Path, data: dict[str, Any]) -> Path:
    return write_new_file(folder / "runs", "run.json", _json_bytes(data), numbered_with_counter)


class Lock:
    """<dir>/.lock holds the pid of the run using the folder; a lock left by a dead process is taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self.held = False

    def __enter__(self) -> "Lock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise StudyError(f"--out: another run (process {pid}) is working in {self.path.parent}; "
                                     "wait for it or stop it first") from None
                self.path.unlink(missing_ok=True)  # left by a run that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise StudyError(f"--out: cannot take the lock {self.path}; remove it if no run is working there")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
