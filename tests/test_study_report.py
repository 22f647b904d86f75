"""The study report and the comparison on a hand-made study folder (score files written by hand, tiny
videos for the contact sheet): files, CSV columns and numbers, escaping, no overwriting."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lynx_batch.study import stats
from lynx_batch.study.compare import COMPARE_CSV_COLUMNS, write_comparison
from lynx_batch.study.report import CSV_COLUMNS, write_report
from lynx_batch.study.scoring import SCORE_FORMAT

HOSTILE = 'a <script>alert("x")</script> & <img src=x onerror=alert(1)> prompt'
T975_2 = 4.3026527  # t(0.975, 2), printed tables

# setting -> subject -> per-frame facexlib scores of that subject's one video (None = no face)
SCORES = {
    "s00": {"alice": [0.50, 0.60, 0.70], "bob": [0.30, None, 0.50], "carol": [0.20, 0.20, 0.20]},
    "s01": {"alice": [0.80, 0.80, 0.90], "bob": [0.60, 0.70, None], "carol": [None, None, None]},
}


def _video(path: Path, seed: int) -> None:
    from lynx_core.video import write_video

    rng = np.random.default_rng(seed)
    write_video(rng.integers(0, 255, (3, 48, 64, 3), dtype=np.uint8), path, fps=8)


def make_study(root: Path, name: str = "study A", scores=SCORES, labels=("ip_scale=0.6", "ip_scale=1.0"),
               subjects=("alice", "bob", "carol"), failed: bool = True) -> Path:
    d = root / name.replace(" ", "_")
    (d / "jobs").mkdir(parents=True)
    (d / "scores").mkdir()
    settings = [{"id": sid, "label": labels[i], "values": {"Lynx Sampler.ip_scale": labels[i].split("=")[-1]}}
                for i, sid in enumerate(scores)]
    study = {"name": name, "study_file": str(root / "study.toml"), "study_sha256": "ab" * 32, "settings": settings,
             "subjects": [{"id": s, "face": str(root / f"{s}.png")} for s in subjects],
             "prompts": [{"id": "p00", "text": HOSTILE}], "seeds": [7], "repeats": 1, "evaluators": {}}
    (d / "study.json").write_text(json.dumps(study))
    n = 0
    for sid, per_subject in scores.items():
        for subj, frames in per_subject.items():
            jid = f"{sid}-{subj}-p00-7-0"
            rel = f"videos/{jid}/clip_00001.mp4"
            (d / rel).parent.mkdir(parents=True)
            _video(d / rel, n)
            n += 1
            job = {"job_id": jid, "setting_id": sid, "subject_id": subj, "face": str(root / f"{subj}.png"),
                   "prompt_id": "p00", "prompt": HOSTILE, "seed": 7, "repeat": 0, "status": "done", "error": None,
                   "videos": [rel]}
            (d / "jobs" / f"{jid}.json").write_text(json.dumps(job))
            fx = {"frame_indices": [0, 1, 2], "per_frame": frames, **stats.frame_stats(frames)}
            ins = [None if v is None else v - 0.1 for v in frames]
            score = {"format": SCORE_FORMAT, "job_id": jid, "face_sha256": "0" * 64,
                     "evaluators": {"facexlib_arcface": {"name": "facexlib_arcface", "version": "1",
                                                         "model": "recognition_arcface_ir_se50.pth",
                                                         "model_sha256": "f" * 64, "detector": "mtcnn"},
                                    "insightface": {"name": "insightface", "version": "1", "model": "glintr100.onnx",
                                                    "model_sha256": "e" * 64, "detector": "mtcnn"}},
                     "videos": [{"path": rel, "sha256": f"{n:064x}", "frames_decoded": 3,
                                 "scores": {"facexlib_arcface": fx,
                                            "insightface": {"frame_indices": [0, 1, 2], "per_frame": ins,
                                                            **stats.frame_stats(ins)}}}]}
            (d / "scores" / f"{jid}.json").write_text(json.dumps(score))
    if failed:
        (d / "jobs" / "s01-dave-p00-7-0.json").write_text(json.dumps(
            {"job_id": "s01-dave-p00-7-0", "setting_id": "s01", "subject_id": "dave", "prompt_id": "p00",
             "prompt": HOSTILE, "seed": 7, "repeat": 0, "status": "failed", "error": "server <died>", "videos": []}))
        # done, but never scored
        rel = "videos/s00-dave-p00-7-0/clip_00001.mp4"
        (d / rel).parent.mkdir(parents=True)
        _video(d / rel, 99)
        (d / "jobs" / "s00-dave-p00-7-0.json").write_text(json.dumps(
            {"job_id": "s00-dave-p00-7-0", "setting_id": "s00", "subject_id": "dave", "prompt_id": "p00",
             "prompt": HOSTILE, "seed": 7, "repeat": 0, "status": "done", "error": None, "videos": [rel]}))
    return d


@pytest.fixture()
def study(tmp_path):
    return make_study(tmp_path)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        return list(reader)


def test_report_files_and_csv_rows(study):
    paths = write_report(study)
    assert set(paths) == {"csv", "json", "html"} and all(p.is_file() for p in paths.values())
    assert paths["html"] == study / "report" / "report.html"
    rows = _csv(paths["csv"])
    scored = [r for r in rows if r["evaluator"]]
    assert len(scored) == 6 * 2  # one row per video and evaluator
    assert {r["status"] for r in rows if not r["evaluator"]} == {"unscored", "failed"}
    bob = next(r for r in scored if r["job_id"] == "s00-bob-p00-7-0" and r["evaluator"] == "facexlib_arcface")
    assert float(bob["mean"]) == pytest.approx(0.4) and bob["frames_no_face"] == "1" and bob["frames_total"] == "3"
    assert bob["setting_label"] == "ip_scale=0.6" and json.loads(bob["setting_values"]) == {"Lynx Sampler.ip_scale": "0.6"}
    carol = next(r for r in scored if r["job_id"] == "s01-carol-p00-7-0" and r["evaluator"] == "insightface")
    assert carol["status"] == "no_face" and carol["mean"] == "" and carol["frames_no_face"] == "3"
    assert bob["prompt"] == HOSTILE  # the CSV keeps the text as it is (quoted by the csv module)


def test_report_json_statistics(study):
    data = json.loads(write_report(study)["json"].read_text())
    rows = {(r["setting_id"], r["evaluator"]): r for r in data["summary"]}
    s0 = rows[("s00", "facexlib_arcface")]
    subj = [0.6, 0.4, 0.2]  # alice, bob (frames with a face only), carol
    m = sum(subj) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in subj) / 2)
    assert s0["mean"] == pytest.approx(m) and s0["median"] == pytest.approx(0.4)
    assert (s0["ci_low"], s0["ci_high"]) == pytest.approx((m - T975_2 * s / math.sqrt(3), m + T975_2 * s / math.sqrt(3)),
                                                          abs=1e-6)
    assert s0["frames_total"] == 9 and s0["frames_no_face"] == 1
    s1 = rows[("s01", "facexlib_arcface")]
    assert s1["n_subjects"] == 2 and s1["videos_no_face"] == 1 and s1["frames_no_face"] == 4
    assert rows[("s00", "insightface")]["mean"] == pytest.approx(m - 0.1)  # evaluators are reported apart
    assert data["jobs"] == {"expected": 6, "recorded": 8, "done": 7, "failed": 1, "scored": 6, "unscored": 1,
                            "not_run": 0}
    assert {u["job_id"] for u in data["unscored"]} == {"s00-dave-p00-7-0"}
    assert data["evaluators"]["insightface"]["models"] == [{"model": "glintr100.onnx", "model_sha256": "e" * 64}]
    curve = next(c for c in data["per_frame"] if c["setting_id"] == "s00" and c["evaluator"] == "facexlib_arcface")
    # frame 1: bob has no face there, so the point averages alice and carol only
    assert [p["mean"] for p in curve["points"]] == pytest.approx([(0.5 + 0.3 + 0.2) / 3, 0.4, (0.7 + 0.5 + 0.2) / 3])
    assert [p["no_face"] for p in curve["points"]] == [0, 1, 0]


def test_html_escapes_user_text_and_is_offline(study):
    html = write_report(study)["html"].read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "server <died>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and "server &lt;died&gt;" in html
    assert html.count("<script>") == 1  # ours only
    # nothing is fetched from elsewhere: the only URL is the SVG namespace, and pictures are relative
    assert "https://" not in html and html.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http://") == 0
    for kind in ("settings", "subjects", "frames", "missing"):
        assert html.count(f'data-kind="{kind}"') == 2, kind  # one panel per evaluator
    assert len(html) < 200_000


def test_contact_sheet_pictures_are_files_next_to_the_page(study):
    paths = write_report(study)
    html = paths["html"].read_text()
    assets = sorted((study / "report" / "report_assets").glob("*.jpg"))
    assert len(assets) == 6  # one strip per scored video
    for a in assets:
        assert f'src="report_assets/{a.name}"' in html
    from PIL import Image

    with Image.open(assets[0]) as im:
        assert im.height == 96 and im.width == 3 * 128 + 2 * 2  # 3 frames of 64x48 scaled to height 96


def test_rerun_keeps_a_report_that_changed(study):
    first = write_report(study)
    before = {k: p.read_bytes() for k, p in first.items()}
    again = write_report(study)
    assert {k: p.read_bytes() for k, p in again.items()} == before
    assert not (study / "report" / "previous").exists()
    # A new score changes the report: the old files are kept, numbered.
    score_path = study / "scores" / "s00-carol-p00-7-0.json"
    score = json.loads(score_path.read_text())
    score["videos"][0]["scores"]["facexlib_arcface"]["mean"] = 0.25
    score_path.write_text(json.dumps(score))
    write_report(study)
    prev = study / "report" / "previous"
    assert (prev / "report.csv").read_bytes() == before["csv"]
    assert (prev / "report.html").read_bytes() == before["html"]


def test_comparison_pairs_subjects(tmp_path):
    a = make_study(tmp_path, "study A", failed=False)
    b_scores = {"s00": {"alice": [0.7, 0.8, 0.9], "bob": [0.5, 0.5, 0.5], "erin": [0.1, 0.1, 0.1]},
                "s01": {"alice": [0.9, 0.9, 0.9]}}
    b = make_study(tmp_path, "study B", scores=b_scores, labels=("ip_scale=0.6", "ip_scale=2.0"),
                   subjects=("alice", "bob", "erin"), failed=False)
    paths = write_comparison(a, b, tmp_path / "cmp")
    data = json.loads(paths["json"].read_text())
    row = next(r for r in data["rows"] if r["setting_a"] == "s00" and r["evaluator"] == "facexlib_arcface")
    # paired over alice (0.8 - 0.6) and bob (0.5 - 0.4); carol and erin are in one study only
    assert row["n_paired"] == 2 and row["diff"] == pytest.approx(0.15)
    lo, hi = row["diff_ci_low"], row["diff_ci_high"]
    half = 12.7062047 * math.sqrt(((0.2 - 0.15) ** 2 + (0.1 - 0.15) ** 2) / 1) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((0.15 - half, 0.15 + half), abs=1e-6)
    assert row["diff_unpaired"] == pytest.approx((0.8 + 0.5 + 0.1) / 3 - (0.6 + 0.4 + 0.2) / 3)
    assert row["welch_low"] is not None
    # s01 is "ip_scale=1.0" in A and "ip_scale=2.0" in B: other label and other values, so unmatched
    assert {(u["study"], u["setting_id"]) for u in data["unmatched"]} == {("A", "s01"), ("B", "s01")}
    with open(paths["csv"], newline="") as f:
        assert csv.DictReader(f).fieldnames == COMPARE_CSV_COLUMNS
    html = paths["html"].read_text()
    assert 'data-kind="diff"' in html and "<script>alert" not in html


def test_comparison_matches_by_values_when_labels_differ(tmp_path):
    a = make_study(tmp_path, "study A", failed=False)
    b = make_study(tmp_path, "study B", labels=("low", "high"), failed=False)
    b_json = json.loads((b / "study.json").read_text())
    for s, v in zip(b_json["settings"], ("0.6", "1.0")):
        s["values"] = {"Lynx Sampler.ip_scale": v}
    (b / "study.json").write_text(json.dumps(b_json))
    data = json.loads(write_comparison(a, b, tmp_path / "cmp")["json"].read_text())
    assert {(r["setting_a"], r["setting_b"], r["matched_by"]) for r in data["rows"]} == {
        ("s00", "s00", "values"), ("s01", "s01", "values")}
    assert all(r["diff"] == pytest.approx(0.0) for r in data["rows"] if r["diff"] is not None)


def test_report_needs_no_torch(study):
    """The report and the comparison run where torch is missing (only numpy, Pillow and PyAV)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from lynx_batch.study.report import write_report\n"
            "from lynx_batch.study.compare import write_comparison\n"
            f"p = write_report({str(study)!r})\n"
            f"write_comparison({str(study)!r}, {str(study)!r}, {str(study / 'cmp')!r})\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(list((study / "report" / "report_assets").glob("*.jpg"))) == 6
    assert (study / "cmp" / "comparison.html").is_file()
