"""The study report: report.csv, report.json and an offline report.html in ``<study_dir>/report/``.

It reads study.json, jobs/ and scores/ (written by :func:`lynx_batch.study.scoring.score_study`)
and never the models, so it runs without torch. Statistics: :mod:`lynx_batch.study.stats`.

Files are written through a temporary name and a rename. A previous report that differs is not
overwritten: it is moved to ``report/previous/`` (numbered) first. The contact-sheet pictures
``report/report_assets/<job>_<n>_<sha12>.jpg`` are named by the video's sha256, so they are made
once and reused by later reports.
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from . import stats
from .scoring import atomic_write_bytes, read_jobs, read_score, read_study, video_paths

__all__ = ["write_report", "collect", "CSV_COLUMNS", "REPORT_DIR"]

REPORT_DIR = "report"
ASSETS_DIR = "report_assets"
REPORT_FORMAT = "lynx-study-report/1"
CSV_COLUMNS = ["job_id", "status", "setting_id", "setting_label", "setting_values", "subject_id", "prompt_id",
               "prompt", "seed", "repeat", "video", "video_sha256", "evaluator", "evaluator_version", "model",
               "model_sha256", "mean", "median", "std", "iqr", "min", "max", "frames_total", "frames_no_face",
               "face_missing_rate", "error"]
THUMB_HEIGHT = 96
METHOD = {
    "summary": ("Per setting and evaluator, each subject's videos are averaged first (a video's score is the mean "
                "cosine over its frames with a face); mean, median and the 95 % Student-t interval "
                "(mean ± t(0.975, n−1)·s/√n, s with ddof 1) are taken over those subject averages. Videos without "
                "any face have no score and are counted as 'videos w/o face'; 'face missing' is frames without a "
                "face / frames scored. Stability: the std (ddof 0) and IQR of each video's per-frame scores, "
                "averaged over the videos."),
    "interval": "student-t over subjects, 95 %, deterministic (no resampling)",
    "unit": "subject",
}


def _setting_maps(study: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    labels = {s["id"]: s.get("label") or s["id"] for s in study["settings"]}
    values = {s["id"]: s.get("values", {}) for s in study["settings"]}
    return labels, values


def collect(study_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, as plain data (what report.json holds)."""
    study_dir = Path(study_dir)
    study = read_study(study_dir)
    labels, values = _setting_maps(study)
    prompts = {p["id"]: p.get("text", "") for p in study.get("prompts", [])}
    jobs = read_jobs(study_dir)
    records: list[dict[str, Any]] = []
    unscored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    evaluators: dict[str, dict[str, Any]] = {}
    scored = 0
    for job in jobs:
        jid = job["job_id"]
        if job.get("status") != "done":
            failed.append({"job_id": jid, "status": job.get("status", "?"), "reason": job.get("error") or "",
                           **_job_fields(job, labels, values, prompts)})
            continue
        score = read_score(study_dir, jid)
        current = video_paths(job)
        if not score or score.get("format", "").startswith("unreadable"):
            unscored.append({"job_id": jid, "status": "unscored", "reason": "no score yet: run the scoring",
                             **_job_fields(job, labels, values, prompts)})
            continue
        if [v.get("path") for v in score.get("videos", [])] != current:
            unscored.append({"job_id": jid, "status": "unscored",
                             "reason": "the score is for other video files: run the scoring again",
                             **_job_fields(job, labels, values, prompts)})
            continue
        scored += 1
        for name, info in score.get("evaluators", {}).items():
            ev = evaluators.setdefault(name, {"versions": [], "models": [], "detectors": []})
            if info.get("version") not in ev["versions"]:
                ev["versions"].append(info.get("version"))
            model = {"model": info.get("model"), "model_sha256": info.get("model_sha256", "")}
            if model not in ev["models"]:
                ev["models"].append(model)
            if info.get("detector") not in ev["detectors"]:
                ev["detectors"].append(info.get("detector"))
        for video in score.get("videos", []):
            for name, s in video.get("scores", {}).items():
                info = score["evaluators"].get(name, {})
                records.append({
                    **_job_fields(job, labels, values, prompts),
                    "job_id": jid, "status": "scored" if s.get("mean") is not None else "no_face",
                    "video": video["path"], "video_sha256": video.get("sha256"), "evaluator": name,
                    "evaluator_version": info.get("version"), "model": info.get("model"),
                    "model_sha256": info.get("model_sha256"),
                    **{k: s.get(k) for k in ("mean", "median", "std", "iqr", "min", "max", "frames_total",
                                             "frames_no_face", "per_frame", "frame_indices")},
                })
    for r in records:
        r["face_missing_rate"] = (r["frames_no_face"] / r["frames_total"]) if r["frames_total"] else None
    settings_order = {s["id"]: i for i, s in enumerate(study["settings"])}
    records.sort(key=lambda r: (settings_order.get(r["setting_id"], 1 << 30), r["subject_id"] or "",
                                r["prompt_id"] or "", str(r["seed"]), str(r["repeat"]), r["job_id"], r["video"],
                                r["evaluator"]))
    expected = (len(study["settings"]) * len(study["subjects"]) * max(1, len(study.get("prompts", [])))
                * max(1, len(study.get("seeds", [])))) * int(study.get("repeats", 1) or 1)
    done = sum(1 for j in jobs if j.get("status") == "done")
    return {
        "format": REPORT_FORMAT,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "study": {k: study.get(k) for k in ("name", "study_file", "study_sha256", "seeds", "repeats")}
        | {"n_settings": len(study["settings"]), "n_subjects": len(study["subjects"]),
           "n_prompts": len(study.get("prompts", []))},
        "method": METHOD,
        "settings": study["settings"],
        "subjects": study["subjects"],
        "evaluators": evaluators,
        "jobs": {"expected": expected, "recorded": len(jobs), "done": done, "failed": len(failed),
                 "scored": scored, "unscored": len(unscored), "not_run": max(0, expected - len(jobs))},
        "summary": stats.summarize(records),
        "per_subject": stats.per_subject(records),
        "per_frame": stats.per_frame(records),
        "videos": records,
        "unscored": unscored,
        "failed": failed,
    }


def _job_fields(job: dict[str, Any], labels: dict[str, str], values: dict[str, Any],
                prompts: dict[str, str]) -> dict[str, Any]:
    sid = job.get("setting_id")
    return {"setting_id": sid, "setting_label": labels.get(sid, sid), "setting_values": values.get(sid, {}),
            "subject_id": job.get("subject_id"), "prompt_id": job.get("prompt_id"),
            "prompt": job.get("prompt", prompts.get(job.get("prompt_id"), "")), "seed": job.get("seed"),
            "repeat": job.get("repeat")}


# ---- CSV -------------------------------------------------------------------------------------------------

def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        # A spreadsheet would run a prompt such as "=HYPERLINK(...)" as a formula.
        return "'" + value
    return value


def csv_bytes(data: dict[str, Any]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in data["videos"]:
        writer.writerow({k: _cell(r.get(k)) for k in CSV_COLUMNS})
    for r in data["unscored"] + data["failed"]:
        writer.writerow({k: _cell(v) for k, v in {**r, "error": r.get("reason")}.items() if k in CSV_COLUMNS})
    return buf.getvalue().encode("utf-8")


# ---- contact sheet -------------------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _pick(indices: list[int], n: int) -> list[int]:
    if n <= 0 or not indices:
        return []
    if len(indices) <= n:
        return list(indices)
    return [indices[round(i * (len(indices) - 1) / (n - 1))] for i in range(n)] if n > 1 else [indices[0]]


def _strip(frames, height: int):
    from PIL import Image

    tiles = []
    for f in frames:
        im = Image.fromarray(f)
        w = max(1, round(im.width * height / im.height))
        tiles.append(im.resize((w, height), Image.BILINEAR))
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), height), (255, 255, 255))
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 2
    return sheet


def _contact_sheets(study_dir: Path, out_dir: Path, data: dict[str, Any], per_video: int) -> dict:
    """(job_id, video) -> {"src", "frames", "width", "height"} or {"error"}; pictures made once per video sha."""
    from .scoring import read_scored_frames

    assets = out_dir / ASSETS_DIR
    first = next(iter(data["evaluators"]), None)
    sheets: dict[tuple[str, str], dict[str, Any]] = {}
    for r in data["videos"]:
        if r["evaluator"] != first or (r["job_id"], r["video"]) in sheets:
            continue
        picked = _pick(list(r["frame_indices"] or []), per_video)
        key = (r["job_id"], r["video"])
        if not picked:
            continue
        n = len([k for k in sheets if k[0] == r["job_id"]])
        name = f"{_SAFE.sub('-', r['job_id'])}_{n}_{(r['video_sha256'] or 'nosha')[:12]}_{len(picked)}.jpg"
        path = assets / name
        try:
            if not path.exists():
                _idx, frames, _dec = read_scored_frames(study_dir / r["video"], 1, max(picked) + 1)
                sheet = _strip(frames[picked], THUMB_HEIGHT)
                buf = io.BytesIO()
                sheet.save(buf, format="JPEG", quality=78)
                atomic_write_bytes(path, buf.getvalue())
            from PIL import Image

            with Image.open(path) as im:
                width, height = im.size
            sheets[key] = {"src": f"{ASSETS_DIR}/{name}", "frames": picked, "width": width, "height": height}
        except Exception as exc:  # a contact sheet must never stop the report
            sheets[key] = {"error": f"could not read frames of {r['video']}: {exc}"}
    return sheets


# ---- writing -------------------------------------------------------------------------------------------------

def write_kept(path: Path, data: bytes) -> Path:
    """Write ``path`` atomically; an existing different file is first moved to ``previous/`` (numbered)."""
    from lynx_batch.files import numbered_with_counter, write_new_file

    if path.exists():
        old = path.read_bytes()
        if old == data:
            return path
        folder = path.parent / "previous"
        folder.mkdir(parents=True, exist_ok=True)
        write_new_file(folder, path.name, old, numbered_with_counter)
    atomic_write_bytes(path, data)
    return path


def _contact_frames(study: dict[str, Any]) -> int:
    value = (study.get("evaluators") or {}).get("contact_frames", 6)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 6


def write_report(study_dir: str | Path) -> dict[str, Path]:
    """Write report.csv, report.json and report.html into ``<study_dir>/report/``; returns their paths."""
    from .html import render_report

    study_dir = Path(study_dir)
    data = collect(study_dir)
    out_dir = study_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    sheets = _contact_sheets(study_dir, out_dir, data, _contact_frames(read_study(study_dir)))
    # generated_at differs on every run; keep it out of the comparison with the previous files.
    stamp = data["generated_at"]
    body = dict(data, generated_at=None)
    old_json = out_dir / "report.json"
    if old_json.exists():
        try:
            unchanged = json.loads(old_json.read_text(encoding="utf-8")) | {"generated_at": None} == body
        except ValueError:
            unchanged = False
        if unchanged:
            stamp = json.loads(old_json.read_text(encoding="utf-8")).get("generated_at") or stamp
    data["generated_at"] = stamp
    paths = {
        "csv": write_kept(out_dir / "report.csv", csv_bytes(data)),
        "json": write_kept(out_dir / "report.json",
                           (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")),
        "html": write_kept(out_dir / "report.html", render_report(data, sheets).encode("utf-8")),
    }
    return paths
