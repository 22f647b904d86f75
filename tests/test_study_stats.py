"""The study statistics on hand-made numbers with known answers."""
from __future__ import annotations

import math

import pytest

from lynx_batch.study import stats

# Student t quantiles from printed tables (two-sided 95 %: p = 0.975).
T975 = {1: 12.7062047, 2: 4.3026527, 4: 2.7764451, 10: 2.2281389, 30: 2.0422725}


def test_mean_median_quantiles_ignore_missing():
    assert stats.mean([1.0, None, 2.0, 6.0]) == 3.0
    assert stats.median([5.0, 1.0, 3.0]) == 3.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert stats.mean([]) is None and stats.median([None]) is None
    # linear interpolation between order statistics (numpy's default): positions (n-1)q
    assert stats.quantile([1, 2, 3, 4, 5], 0.25) == 2.0
    assert stats.quantile([10, 20, 30, 40], 0.75) == pytest.approx(32.5)
    assert stats.iqr([1, 2, 3, 4, 5]) == 2.0
    assert stats.iqr([0.7]) == 0.0


def test_spreads():
    assert stats.pstdev([2, 4, 4, 4, 5, 5, 7, 9]) == 2.0  # the textbook example, ddof 0
    assert stats.stdev([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(math.sqrt(32 / 7))
    assert stats.stdev([1.0]) is None


@pytest.mark.parametrize("df,expected", sorted(T975.items()))
def test_t_quantile_matches_tables(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert stats.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)


def test_t_quantile_tends_to_the_normal():
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_t_interval_by_hand():
    xs = [0.5, 0.6, 0.7]  # mean 0.6, s = 0.1, n = 3
    lo, hi = stats.t_interval(xs)
    half = T975[2] * 0.1 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((0.6 - half, 0.6 + half), abs=1e-7)
    assert stats.t_interval([0.4]) is None  # one subject: no interval
    assert stats.t_interval([0.3, 0.3]) == pytest.approx((0.3, 0.3))


def test_welch_interval_by_hand():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    va, vb = 1.0 / 3, (20.0 / 3) / 4  # s² / n
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    assert df == pytest.approx(4.0754717)  # Welch-Satterthwaite, a fractional df
    lo, hi = stats.welch_interval(a, b)
    half = 2.7562849 * math.sqrt(va + vb)  # t(0.975, 4.0754717), from scipy.stats.t.ppf
    assert (lo, hi) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-6)


def test_frame_stats_count_missing_faces():
    s = stats.frame_stats([0.5, None, 0.7, None, 0.9])
    assert s["frames_total"] == 5 and s["frames_no_face"] == 2
    assert s["mean"] == pytest.approx(0.7) and s["median"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert s["iqr"] == pytest.approx(0.2) and (s["min"], s["max"]) == (0.5, 0.9)
    none = stats.frame_stats([None, None])
    assert none["mean"] is None and none["frames_no_face"] == 2 and none["std"] is None


def _rec(setting, subject, mean, total=4, no_face=0, ev="facexlib_arcface", per_frame=None, std=0.0):
    return {"setting_id": setting, "subject_id": subject, "evaluator": ev, "mean": mean, "frames_total": total,
            "frames_no_face": no_face, "std": std, "iqr": 0.0, "per_frame": per_frame or [], "frame_indices": None}


def test_subjects_are_averaged_before_the_interval():
    # alice has three videos, bob one, carol one: the mean is over 3 subject averages, not 5 videos.
    recs = [_rec("s0", "alice", 0.9), _rec("s0", "alice", 0.8), _rec("s0", "alice", 0.7),
            _rec("s0", "bob", 0.5), _rec("s0", "carol", 0.3)]
    (row,) = stats.summarize(recs)
    assert stats.subject_means(recs) == pytest.approx({"alice": 0.8, "bob": 0.5, "carol": 0.3})
    assert row["n_subjects"] == 3 and row["n_videos"] == 5
    assert row["mean"] == pytest.approx((0.8 + 0.5 + 0.3) / 3)
    assert row["video_mean"] == pytest.approx(0.64)  # the per-video mean differs, and is reported apart
    assert row["median"] == pytest.approx(0.5)
    s = math.sqrt(((0.8 - 0.5333333) ** 2 + (0.5 - 0.5333333) ** 2 + (0.3 - 0.5333333) ** 2) / 2)
    half = T975[2] * s / math.sqrt(3)
    assert row["ci_low"] == pytest.approx(0.5333333 - half, abs=1e-6)
    assert row["ci_high"] == pytest.approx(0.5333333 + half, abs=1e-6)


def test_missing_faces_are_counted_not_dropped():
    recs = [_rec("s0", "alice", 0.6, total=10, no_face=2), _rec("s0", "alice", None, total=10, no_face=10),
            _rec("s0", "bob", None, total=5, no_face=5)]
    (row,) = stats.summarize(recs)
    assert row["n_videos"] == 3 and row["n_videos_scored"] == 1 and row["videos_no_face"] == 2
    assert row["frames_total"] == 25 and row["frames_no_face"] == 17
    assert row["face_missing_rate"] == pytest.approx(17 / 25)
    # bob never showed a face: he has no average, so only alice counts and there is no interval
    assert row["n_subjects"] == 1 and row["mean"] == pytest.approx(0.6) and row["ci_low"] is None
    subj = {r["subject_id"]: r for r in stats.per_subject(recs)}
    assert subj["bob"]["mean"] is None and subj["bob"]["videos_no_face"] == 1
    assert subj["alice"]["face_missing_rate"] == pytest.approx(12 / 20)


def test_settings_and_evaluators_are_kept_apart():
    recs = [_rec("s0", "a", 0.5), _rec("s1", "a", 0.7), _rec("s0", "a", 0.2, ev="insightface")]
    rows = {(r["setting_id"], r["evaluator"]): r["mean"] for r in stats.summarize(recs)}
    assert rows == pytest.approx({("s0", "facexlib_arcface"): 0.5, ("s1", "facexlib_arcface"): 0.7,
                                  ("s0", "insightface"): 0.2})


def test_per_frame_curve_uses_frame_numbers_and_counts_missing():
    recs = [_rec("s0", "a", None, per_frame=[0.2, None, 0.6]), _rec("s0", "b", None, per_frame=[0.4, 0.5, None])]
    recs[0]["frame_indices"] = [0, 4, 8]
    recs[1]["frame_indices"] = [0, 4, 8]
    (curve,) = stats.per_frame(recs)
    assert [p["frame"] for p in curve["points"]] == [0, 4, 8]
    assert [p["mean"] for p in curve["points"]] == pytest.approx([0.3, 0.5, 0.6])
    assert [(p["n"], p["no_face"]) for p in curve["points"]] == [(2, 0), (1, 1), (1, 1)]


def test_stability_is_the_mean_of_the_video_spreads():
    recs = [_rec("s0", "a", 0.5, std=0.1), _rec("s0", "b", 0.5, std=0.3)]
    assert stats.summarize(recs)[0]["stability_std"] == pytest.approx(0.2)
