"""Side-by-side comparison of two scored studies: comparison.csv, comparison.json, comparison.html.

Settings are matched by label first, then (for those left) by equal values. For each matched
pair and each evaluator both studies have, the difference B − A is taken PAIRED by subject over
the subjects both studies scored (each subject's videos averaged first, as in the report), with
the 95 % Student-t interval of the paired differences; the unpaired difference over all subjects
of each study comes with Welch's interval. Evaluators whose model files differ between the two
studies are flagged: their numbers are not comparable.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from . import stats
from .report import _cell, collect, write_kept

__all__ = ["write_comparison", "compare", "match_settings", "COMPARE_CSV_COLUMNS"]

COMPARE_CSV_COLUMNS = ["label", "setting_a", "setting_b", "matched_by", "evaluator", "mean_a", "ci_low_a", "ci_high_a",
                       "n_subjects_a", "mean_b", "ci_low_b", "ci_high_b", "n_subjects_b", "n_paired", "diff",
                       "diff_ci_low", "diff_ci_high", "diff_unpaired", "welch_low", "welch_high",
                       "face_missing_rate_a", "face_missing_rate_b"]
METHOD = ("B − A per matched setting: each subject's videos are averaged first; the paired difference is taken over "
          "the subjects both studies scored, with the 95 % Student-t interval of the per-subject differences "
          "(none below 2 paired subjects). 'All subjects' is the difference of the two studies' means over their "
          "own subjects, with Welch's 95 % interval.")


def match_settings(a: list[dict], b: list[dict]) -> tuple[list[tuple[dict, dict, str]], list[dict], list[dict]]:
    """(pairs (setting A, setting B, "label" | "values"), unmatched A, unmatched B)."""
    pairs: list[tuple[dict, dict, str]] = []
    left_b = list(b)
    left_a = []
    for sa in a:
        hit = next((sb for sb in left_b if sb.get("label") and sb.get("label") == sa.get("label")), None)
        if hit is not None:
            pairs.append((sa, hit, "label"))
            left_b.remove(hit)
        else:
            left_a.append(sa)
    still_a = []
    for sa in left_a:
        hit = next((sb for sb in left_b if sb.get("values", {}) == sa.get("values", {})), None)
        if hit is not None:
            pairs.append((sa, hit, "values"))
            left_b.remove(hit)
        else:
            still_a.append(sa)
    return pairs, still_a, left_b


def _summary_row(data: dict, setting_id: str, evaluator: str) -> dict:
    return next((r for r in data["summary"] if r["setting_id"] == setting_id and r["evaluator"] == evaluator), {})


def compare(dir_a: str | Path, dir_b: str | Path) -> dict[str, Any]:
    a, b = collect(dir_a), collect(dir_b)
    pairs, only_a, only_b = match_settings(a["settings"], b["settings"])
    warnings = []
    common = [e for e in a["evaluators"] if e in b["evaluators"]]
    for e in sorted(set(a["evaluators"]) ^ set(b["evaluators"])):
        warnings.append(f"evaluator {e} scored only one of the studies; it is left out of the comparison")
    for e in common:
        if a["evaluators"][e]["models"] != b["evaluators"][e]["models"]:
            warnings.append(f"evaluator {e} used other model files in A and B "
                            f"({a['evaluators'][e]['models']} vs {b['evaluators'][e]['models']}): its differences "
                            "mix models and studies")
    rows, per_subject = [], []
    for sa, sb, how in pairs:
        label = sa.get("label") or sa["id"]
        if how == "values" and sb.get("label") != sa.get("label"):
            label = f"{sa.get('label') or sa['id']} / {sb.get('label') or sb['id']}"
        for e in common:
            ma = stats.subject_means([r for r in a["videos"] if r["setting_id"] == sa["id"] and r["evaluator"] == e])
            mb = stats.subject_means([r for r in b["videos"] if r["setting_id"] == sb["id"] and r["evaluator"] == e])
            paired = sorted(set(ma) & set(mb))
            diffs = [mb[s] - ma[s] for s in paired]
            ci = stats.t_interval(diffs)
            welch = stats.welch_interval(ma.values(), mb.values())
            ra, rb = _summary_row(a, sa["id"], e), _summary_row(b, sb["id"], e)
            rows.append({
                "label": label, "setting_a": sa["id"], "setting_b": sb["id"], "matched_by": how, "evaluator": e,
                "mean_a": ra.get("mean"), "ci_low_a": ra.get("ci_low"), "ci_high_a": ra.get("ci_high"),
                "n_subjects_a": len(ma), "mean_b": rb.get("mean"), "ci_low_b": rb.get("ci_low"),
                "ci_high_b": rb.get("ci_high"), "n_subjects_b": len(mb), "n_paired": len(paired),
                "diff": stats.mean(diffs), "diff_ci_low": ci[0] if ci else None, "diff_ci_high": ci[1] if ci else None,
                "diff_unpaired": (stats.mean(mb.values()) - stats.mean(ma.values())) if ma and mb else None,
                "welch_low": welch[0] if welch else None, "welch_high": welch[1] if welch else None,
                "face_missing_rate_a": ra.get("face_missing_rate"), "face_missing_rate_b": rb.get("face_missing_rate"),
            })
            per_subject += [{"label": label, "evaluator": e, "subject_id": s, "mean_a": ma[s], "mean_b": mb[s],
                             "diff": mb[s] - ma[s]} for s in paired]
    unmatched = ([{"study": "A", "setting_id": s["id"], "label": s.get("label", "")} for s in only_a]
                 + [{"study": "B", "setting_id": s["id"], "label": s.get("label", "")} for s in only_b])
    return {
        "format": "lynx-study-comparison/1",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": METHOD,
        "a": {"dir": str(Path(dir_a)), "name": a["study"]["name"], "jobs": a["jobs"]},
        "b": {"dir": str(Path(dir_b)), "name": b["study"]["name"], "jobs": b["jobs"]},
        "warnings": warnings,
        "rows": rows,
        "per_subject": per_subject,
        "unmatched": unmatched,
    }


def write_comparison(dir_a: str | Path, dir_b: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Compare two study folders; writes comparison.csv/.json/.html into ``out_dir`` and returns their paths."""
    from .html import render_comparison

    data = compare(dir_a, dir_b)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COMPARE_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in data["rows"]:
        writer.writerow({k: _cell(r.get(k)) for k in COMPARE_CSV_COLUMNS})
    return {
        "csv": write_kept(out / "comparison.csv", buf.getvalue().encode("utf-8")),
        "json": write_kept(out / "comparison.json",
                           (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8")),
        "html": write_kept(out / "comparison.html", render_comparison(data).encode("utf-8")),
    }
