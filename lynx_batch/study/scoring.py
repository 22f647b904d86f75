"""Score a study's videos: face resemblance per frame and per video, for every evaluator.

For every job in ``<study_dir>/jobs/`` with status ``done``, ``score_study`` writes
``<study_dir>/scores/<job_id>.json`` (format :data:`SCORE_FORMAT`) holding, per video and per
evaluator, the cosine of every scored frame to the subject's identity photo (``null`` where the
frame shows no face), the video mean over the frames with a face, ``frames_total``,
``frames_no_face``, the stability (std and IQR of the per-frame scores), and each evaluator's
name, version and model sha256.

Resuming: a score file is up to date when its videos (paths and sha256), the identity photo's
sha256 and the evaluators (name, version, model sha256, detector, frame settings) all equal the
current ones; such jobs are skipped. A stale file (a video re-rendered, a model changed, an
evaluator added) is never overwritten: it is moved to ``scores/superseded/<job_id>_NNNN.json``
first, then the new result takes its place. Every file is written to a temporary name and
renamed, so an interrupted run leaves either the old or the new file, never half of one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ..files import replace_atomically, sha256_file

__all__ = ["SCORE_FORMAT", "score_study", "read_study", "read_jobs", "read_score", "scored_frame_indices",
           "read_scored_frames", "decode_frames", "video_paths", "atomic_write_json"]

SCORE_FORMAT = "lynx-study-scores/1"
SCORES_DIR = "scores"
SUPERSEDED_DIR = "superseded"
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".webp")


class StudyDirError(ValueError):
    """The study folder is not what the runner writes (the message names the file)."""


# ---- reading the study folder ------------------------------------------------------------------------

def read_study(study_dir: Path) -> dict[str, Any]:
    path = Path(study_dir) / "study.json"
    if not path.is_file():
        raise StudyDirError(f"{path} does not exist: give the folder that `python -m lynx_batch study run` made")
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudyDirError(f"{path} cannot be read as JSON ({exc}); it is written by the study runner") from exc
    for key in ("settings", "subjects"):
        if not isinstance(study.get(key), list):
            raise StudyDirError(f"{path}: '{key}' is missing or not a list")
    return study


def read_jobs(study_dir: Path) -> list[dict[str, Any]]:
    """Every job record, sorted by job id (unreadable files are reported, not skipped)."""
    folder = Path(study_dir) / "jobs"
    jobs = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            job = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StudyDirError(f"{path} cannot be read as JSON ({exc}); delete it so the runner redoes the job") from exc
        job.setdefault("job_id", path.stem)
        jobs.append(job)
    return jobs


def read_score(study_dir: Path, job_id: str) -> dict[str, Any] | None:
    path = Path(study_dir) / SCORES_DIR / f"{job_id}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"format": "unreadable"}  # treated as stale: kept aside, then scored again
    return data if isinstance(data, dict) else {"format": "unreadable"}


def video_paths(job: dict[str, Any]) -> list[str]:
    """The job's video files (relative to the study folder); pictures and other outputs are not scored."""
    return [v for v in job.get("videos") or [] if Path(v).suffix.lower() in VIDEO_EXTS]


# ---- files ---------------------------------------------------------------------------------------------

def atomic_write_bytes(path: Path, data: bytes) -> None:
    replace_atomically(path, data)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _supersede(path: Path) -> Path:
    """Move an existing result aside (numbered, never replacing anything) before a new one takes its place."""
    from lynx_batch.files import numbered_with_counter, write_new_file

    folder = path.parent / SUPERSEDED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    kept = write_new_file(folder, path.name, path.read_bytes(), numbered_with_counter)
    return kept


# ---- frames ----------------------------------------------------------------------------------------------

def scored_frame_indices(n_frames: int, frame_stride: int, max_frames: int) -> list[int]:
    """Source frame numbers that are scored: every ``frame_stride``-th from 0, at most ``max_frames`` (0: all)."""
    idx = list(range(0, n_frames, frame_stride))
    return idx[:max_frames] if max_frames else idx


def decode_frames(path: Path, limit: int | None = None):
    """uint8 RGB [F, H, W, 3]: the first ``limit`` frames (all if None) of a video.

    PyAV for mp4/webm/mkv/mov (the decode lynx_core.train.media does), Pillow for animated
    gif/webp; decoding stops at ``limit``. Needs neither torch nor lynx_core, so the report can
    make its contact sheet anywhere.
    """
    import numpy as np

    path = Path(path)
    frames = []
    if path.suffix.lower() in (".gif", ".webp"):
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                frames.append(np.asarray(frame.convert("RGB")))
                if limit is not None and len(frames) >= limit:
                    break
    else:
        import av

        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if limit is not None and len(frames) >= limit:
                    break
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


def read_scored_frames(path: Path, frame_stride: int = 1, max_frames: int = 0):
    """(source frame numbers, uint8 RGB frames [F, H, W, 3], frames decoded) of the frames one video is scored on."""
    needed = (max_frames - 1) * frame_stride + 1 if max_frames else None
    frames = decode_frames(path, needed)
    idx = scored_frame_indices(len(frames), frame_stride, max_frames)
    return idx, frames[idx], len(frames)


# ---- scoring ------------------------------------------------------------------------------------------------

def _fingerprint(evaluators_info: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    # The machine-specific parts (where the model sits) do not make a score stale; its bytes do.
    return {name: {k: v for k, v in info.items() if k != "model_path"} for name, info in evaluators_info.items()}


def _up_to_date(existing: dict[str, Any] | None, videos: list[dict[str, str]], face_sha: str,
                infos: dict[str, dict[str, Any]]) -> bool:
    if not existing or existing.get("format") != SCORE_FORMAT:
        return False
    old_videos = [{"path": v.get("path"), "sha256": v.get("sha256")} for v in existing.get("videos", [])]
    return (old_videos == videos and existing.get("face_sha256") == face_sha
            and _fingerprint(existing.get("evaluators", {})) == _fingerprint(infos))


class _References:
    """Identity embeddings per (evaluator, subject), computed once per run."""

    def __init__(self, subjects: dict[str, dict[str, Any]]) -> None:
        self.subjects = subjects
        self.cache: dict[tuple[str, str], Any] = {}
        self.photos: dict[str, Any] = {}

    def photo(self, subject_id: str, face: str):
        if subject_id not in self.photos:
            from lynx_core.train.media import read_image

            self.photos[subject_id] = read_image(Path(face))
        return self.photos[subject_id]

    def get(self, evaluator, subject_id: str, face: str):
        key = (evaluator.name, subject_id)
        if key not in self.cache:
            try:
                self.cache[key] = evaluator.reference(self.photo(subject_id, face))
            except Exception as exc:
                # Kept, so the subject's other jobs fail at once instead of trying the photo again.
                self.cache[key] = ValueError(f"subject {subject_id!r}: the identity photo {face} gives no "
                                             f"reference for {evaluator.name}: {exc}")
        value = self.cache[key]
        if isinstance(value, ValueError):
            raise value
        return value


def _score_job(study_dir: Path, job: dict[str, Any], videos: list[dict[str, str]], face: str, face_sha: str,
               evaluators, refs: _References, cfg) -> dict[str, Any]:
    from .stats import frame_stats

    out_videos = []
    for v in videos:
        idx, frames, decoded = read_scored_frames(study_dir / v["path"], cfg.frame_stride, cfg.max_frames)
        scores = {}
        for ev in evaluators:
            per_frame = ev.score_frames(frames, refs.get(ev, job["subject_id"], face))
            scores[ev.name] = {"frame_indices": idx, "per_frame": [None if s is None else round(s, 6)
                                                                   for s in per_frame],
                               **frame_stats(per_frame)}
        out_videos.append({**v, "frames_decoded": decoded, "scores": scores})
    return {
        "format": SCORE_FORMAT,
        "job_id": job["job_id"],
        "setting_id": job.get("setting_id"),
        "subject_id": job.get("subject_id"),
        "prompt_id": job.get("prompt_id"),
        "seed": job.get("seed"),
        "repeat": job.get("repeat"),
        "face": face,
        "face_sha256": face_sha,
        "scored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "evaluators": {ev.name: ev.info() for ev in evaluators},
        "videos": out_videos,
    }


def score_study(study_dir: str | Path, *, log: Callable[[str], None] = print) -> None:
    """Write the missing or stale ``scores/<job_id>.json`` of every done job (see the module doc).

    A job that cannot be scored (a video that does not decode, an identity photo without a face)
    is named in the log and left without a score file, so the report counts it as unscored and a
    rerun tries again; the other jobs go on.
    """
    from .evaluators import build_evaluators, parse_config

    study_dir = Path(study_dir)
    study = read_study(study_dir)
    jobs = [j for j in read_jobs(study_dir) if j.get("status") == "done"]
    if not jobs:
        log("scoring: no finished job yet; nothing to score")
        return
    base = Path(study.get("study_file") or study_dir / "study.json").expanduser().parent
    cfg = parse_config(study.get("evaluators"), base)
    evaluators = build_evaluators(cfg, log)
    infos = {ev.name: ev.info() for ev in evaluators}
    subjects = {s["id"]: s for s in study["subjects"]}
    refs = _References(subjects)
    photo_sha: dict[str, str] = {}
    done = skipped = 0
    problems: list[str] = []
    for n, job in enumerate(jobs, 1):
        jid = job["job_id"]
        try:
            face = job.get("face") or subjects.get(job.get("subject_id"), {}).get("face")
            if not face:
                raise ValueError(f"no identity photo for subject {job.get('subject_id')!r} in the job or study.json")
            rel = video_paths(job)
            if not rel:
                raise ValueError("the job is done but lists no video file under 'videos'")
            missing = [r for r in rel if not (study_dir / r).is_file()]
            if missing:
                raise ValueError(f"video file(s) missing: {', '.join(missing)}")
            videos = [{"path": r, "sha256": sha256_file(study_dir / r)} for r in rel]
            if face not in photo_sha:
                photo_sha[face] = sha256_file(Path(face))
            existing = read_score(study_dir, jid)
            if _up_to_date(existing, videos, photo_sha[face], infos):
                skipped += 1
                continue
            result = _score_job(study_dir, job, videos, face, photo_sha[face], evaluators, refs, cfg)
            target = study_dir / SCORES_DIR / f"{jid}.json"
            if target.exists():
                kept = _supersede(target)
                log(f"scoring: {jid}: the old score no longer matches (video, photo or evaluator changed); "
                    f"kept it as {kept.relative_to(study_dir)}")
            atomic_write_json(target, result)
            done += 1
            means = ", ".join(f"{name} {_fmt(v['scores'][name]['mean'])}" for v in result["videos"][:1]
                              for name in v["scores"])
            log(f"scoring: [{n}/{len(jobs)}] {jid}: {means}")
        except KeyboardInterrupt:
            log(f"scoring: interrupted at {jid}; {done} scored this run. Run it again to go on.")
            raise
        except Exception as exc:  # one bad video must not stop a study of hundreds
            problems.append(f"{jid}: {exc}")
            log(f"scoring: {jid}: NOT scored: {exc}")
    log(f"scoring: {done} job(s) scored, {skipped} already up to date, {len(problems)} not scorable"
        + (" (named above; they stay unscored in the report)" if problems else ""))


def _fmt(value: float | None) -> str:
    return "no face" if value is None else f"{value:.4f}"
