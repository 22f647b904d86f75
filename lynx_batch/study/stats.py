"""The statistics of a study report, in plain Python (no numpy, so the report runs anywhere).

Conventions (docs/study.md, "Report"):

* A video's score is the mean of its per-frame cosines over the frames where a face was found;
  a video with no face in any frame has no score and is counted in ``videos_no_face``.
* Per setting and evaluator the unit of replication is the SUBJECT: the videos of each subject
  (all prompts, seeds, repeats) are averaged first, then mean, median and the 95 % interval are
  taken over those subject averages. So a subject with more videos does not weigh more.
* The interval is Student's t: ``mean ± t(0.975, n-1) · s / sqrt(n)`` with the sample standard
  deviation ``s`` (ddof 1). Chosen over a bootstrap because studies often have few subjects
  (a bootstrap of 3 values is far too narrow) and because it needs no random seed: the same
  numbers give the same interval everywhere. With fewer than 2 subjects there is no interval (None).
* Stability of a video: the population standard deviation (ddof 0) and the interquartile range
  (linear interpolation, numpy's default) of its per-frame scores; reported as means over videos.
* Face-missing rate: frames without a face / frames scored, summed over the setting's videos.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "mean", "median", "quantile", "pstdev", "stdev", "iqr", "t_quantile", "t_interval", "welch_interval",
    "frame_stats", "summarize", "per_subject", "per_frame", "subject_means", "LEVEL",
]

LEVEL = 0.95


def _clean(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None]


def mean(values: Iterable[float | None]) -> float | None:
    xs = _clean(values)
    return math.fsum(xs) / len(xs) if xs else None


def quantile(values: Iterable[float | None], q: float) -> float | None:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(_clean(values))
    if not xs:
        return None
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: q must be in [0, 1], got {q}")
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float | None]) -> float | None:
    return quantile(values, 0.5)


def pstdev(values: Iterable[float | None]) -> float | None:
    """Population standard deviation (ddof 0), the spread of one video's frames."""
    xs = _clean(values)
    if not xs:
        return None
    m = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / len(xs))


def stdev(values: Iterable[float | None]) -> float | None:
    """Sample standard deviation (ddof 1); None below 2 values."""
    xs = _clean(values)
    if len(xs) < 2:
        return None
    m = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def iqr(values: Iterable[float | None]) -> float | None:
    xs = _clean(values)
    if not xs:
        return None
    return quantile(xs, 0.75) - quantile(xs, 0.25)  # type: ignore[operator]


# ---- Student's t --------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (modified Lentz).
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` (> 0, may be fractional) degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"t_quantile: df must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    hi = 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):  # bisection to full double precision; deterministic and fast enough
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Iterable[float | None], level: float = LEVEL) -> tuple[float, float] | None:
    """Two-sided t confidence interval of the mean; None below 2 values."""
    xs = _clean(values)
    if len(xs) < 2:
        return None
    m = math.fsum(xs) / len(xs)
    half = t_quantile(0.5 + level / 2.0, len(xs) - 1) * stdev(xs) / math.sqrt(len(xs))  # type: ignore[operator]
    return (m - half, m + half)


def welch_interval(a: Iterable[float | None], b: Iterable[float | None],
                   level: float = LEVEL) -> tuple[float, float] | None:
    """Interval of mean(b) - mean(a) for independent samples (Welch); None below 2 values each."""
    xa, xb = _clean(a), _clean(b)
    if len(xa) < 2 or len(xb) < 2:
        return None
    va, vb = stdev(xa) ** 2 / len(xa), stdev(xb) ** 2 / len(xb)  # type: ignore[operator]
    diff = mean(xb) - mean(xa)  # type: ignore[operator]
    se2 = va + vb
    if se2 == 0.0:
        return (diff, diff)
    df = se2 ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
    half = t_quantile(0.5 + level / 2.0, df) * math.sqrt(se2)
    return (diff - half, diff + half)


# ---- one video ----------------------------------------------------------------------------------

def frame_stats(per_frame: Sequence[float | None]) -> dict[str, Any]:
    """A video's numbers from its per-frame scores (None = no face in that frame)."""
    faces = _clean(per_frame)
    return {
        "mean": mean(faces),
        "median": median(faces),
        "frames_total": len(per_frame),
        "frames_no_face": len(per_frame) - len(faces),
        "std": pstdev(faces),
        "iqr": iqr(faces),
        "min": min(faces) if faces else None,
        "max": max(faces) if faces else None,
    }


# ---- a study: records are one per (video, evaluator) ---------------------------------------------

def _group(records: Iterable[Mapping[str, Any]], *keys: str) -> dict[tuple, list[Mapping[str, Any]]]:
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def subject_means(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Subject id -> mean of that subject's video scores (subjects whose videos never show a face are absent)."""
    out: dict[str, float] = {}
    for (subject,), rows in sorted(_group(records, "subject_id").items()):
        m = mean(r["mean"] for r in rows)
        if m is not None:
            out[subject] = m
    return out


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def summarize(records: Iterable[Mapping[str, Any]], level: float = LEVEL) -> list[dict[str, Any]]:
    """One row per (setting, evaluator): mean/median/interval over subjects, missing faces, stability."""
    rows = []
    for (setting, evaluator), recs in sorted(_group(records, "setting_id", "evaluator").items()):
        subj = subject_means(recs)
        ci = t_interval(subj.values(), level)
        frames_total = sum(int(r["frames_total"]) for r in recs)
        frames_no_face = sum(int(r["frames_no_face"]) for r in recs)
        rows.append({
            "setting_id": setting,
            "evaluator": evaluator,
            "n_subjects": len(subj),
            "n_videos": len(recs),
            "n_videos_scored": sum(1 for r in recs if r["mean"] is not None),
            "videos_no_face": sum(1 for r in recs if r["mean"] is None),
            "mean": mean(subj.values()),
            "median": median(subj.values()),
            "ci_low": ci[0] if ci else None,
            "ci_high": ci[1] if ci else None,
            "video_mean": mean(r["mean"] for r in recs),
            "frames_total": frames_total,
            "frames_no_face": frames_no_face,
            "face_missing_rate": _rate(frames_no_face, frames_total),
            "stability_std": mean(r["std"] for r in recs),
            "stability_iqr": mean(r["iqr"] for r in recs),
        })
    return rows


def per_subject(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, evaluator, subject)."""
    rows = []
    for (setting, evaluator, subject), recs in sorted(_group(records, "setting_id", "evaluator", "subject_id").items()):
        frames_total = sum(int(r["frames_total"]) for r in recs)
        frames_no_face = sum(int(r["frames_no_face"]) for r in recs)
        rows.append({
            "setting_id": setting,
            "evaluator": evaluator,
            "subject_id": subject,
            "n_videos": len(recs),
            "videos_no_face": sum(1 for r in recs if r["mean"] is None),
            "mean": mean(r["mean"] for r in recs),
            "min": min(_clean(r["mean"] for r in recs), default=None),
            "max": max(_clean(r["mean"] for r in recs), default=None),
            "frames_total": frames_total,
            "frames_no_face": frames_no_face,
            "face_missing_rate": _rate(frames_no_face, frames_total),
            "stability_std": mean(r["std"] for r in recs),
        })
    return rows


def per_frame(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, evaluator): the mean curve over frame index (source frame numbers).

    Each point averages the videos' scores at that frame; ``n`` counts the videos that had a face
    there and ``no_face`` those that did not.
    """
    out = []
    for (setting, evaluator), recs in sorted(_group(records, "setting_id", "evaluator").items()):
        at: dict[int, list[float | None]] = defaultdict(list)
        for r in recs:
            indices = r.get("frame_indices") or list(range(len(r["per_frame"])))
            for idx, score in zip(indices, r["per_frame"]):
                at[int(idx)].append(score)
        points = [{"frame": idx, "mean": mean(v), "n": len(_clean(v)), "no_face": sum(1 for s in v if s is None)}
                  for idx, v in sorted(at.items())]
        out.append({"setting_id": setting, "evaluator": evaluator, "points": points})
    return out
