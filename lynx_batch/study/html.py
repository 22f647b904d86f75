"""The offline HTML pages of a study report and of a comparison: one file, inline CSS, JS and SVG.

Nothing is fetched from the network (no CDN, no fonts); the only external references are the
contact-sheet JPEGs under ``report_assets/`` next to the page, by relative path. Every piece of
text from the study (prompts, labels, ids, errors) goes through :func:`esc`.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Sequence
from urllib.parse import quote

__all__ = ["esc", "render_report", "render_comparison", "PALETTE"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1280px;padding:16px 24px;
color:#1d1d22;background:#fafafa}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 4px}
.meta{color:#555}.note{color:#555;font-size:13px;max-width:960px}
.panels{display:flex;flex-wrap:wrap;gap:16px}.panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .title{font-size:13px;font-weight:600}
table{border-collapse:collapse;background:#fff;font-size:12.5px}th,td{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f0f0f3;cursor:pointer;user-select:none;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.bad td{background:#fff3f3}
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:12px;height:12px;
border-radius:2px;margin-right:4px;vertical-align:-1px}
.sheet{display:flex;flex-direction:column;gap:10px}.clip{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:6px}.clip img{display:block;max-width:100%;height:auto;image-rendering:auto}
.frames{display:flex;font-size:11px;color:#444}.frames span{flex:1;text-align:center}.noface{color:#c00}
.scroll{max-height:560px;overflow:auto;border:1px solid #ddd}
input.filter{margin:6px 0;padding:4px 6px;width:320px}
"""

# Sorting and filtering of the tables; only DOM APIs, no network, no eval.
JS = """
(function(){
  function cellValue(td){var v=td.getAttribute('data-v');if(v===null)v=td.textContent;var n=parseFloat(v);
    return (v!==''&&!isNaN(n)&&isFinite(v))?n:v.toLowerCase();}
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads=table.querySelectorAll('thead th');
    heads.forEach(function(th,i){th.addEventListener('click',function(){
      var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
      var asc=th.getAttribute('data-sort')!=='asc';heads.forEach(function(h){h.removeAttribute('data-sort');});
      th.setAttribute('data-sort',asc?'asc':'desc');
      rows.sort(function(a,b){var x=cellValue(a.cells[i]),y=cellValue(b.cells[i]);
        if(x===''||y===''){return (x==='')-(y==='');}  /* empty cells last, either way */
        if(typeof x===typeof y){return (x<y?-1:x>y?1:0)*(asc?1:-1);}return (typeof x==='number'?-1:1)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});});});
  });
  document.querySelectorAll('input.filter').forEach(function(inp){
    var table=document.getElementById(inp.getAttribute('data-table'));if(!table)return;
    inp.addEventListener('input',function(){var q=inp.value.toLowerCase();
      Array.prototype.forEach.call(table.tBodies[0].rows,function(r){
        r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});
  });
  document.documentElement.setAttribute('data-report-ready','1');
})();
"""


def esc(value: Any) -> str:
    """Text for HTML/SVG content and attributes (quotes escaped too)."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.{digits}f}"
    return str(value)


def pct(value: float | None) -> str:
    return "" if value is None else f"{100.0 * value:.1f} %"


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---- SVG charts ------------------------------------------------------------------------------------

class _Chart:
    """A plot area with a numeric y axis; x positions are given by the caller in [0, 1]."""

    def __init__(self, title: str, ylo: float, yhi: float, width: int = 600, height: int = 280,
                 left: int = 52, bottom: int = 64, ylabel: str = "cosine similarity", kind: str = "") -> None:
        self.w, self.h, self.left, self.right, self.top, self.bottom = width, height, left, 14, 28, bottom
        if yhi - ylo < 1e-6:
            ylo, yhi = ylo - 0.05, yhi + 0.05
        self.ylo, self.yhi = ylo, yhi
        self.parts: list[str] = [f'<text class="title" x="{left}" y="17">{esc(title)}</text>']
        self.kind = kind
        self._axes(ylabel)

    def x(self, f: float) -> float:
        return self.left + f * (self.w - self.left - self.right)

    def y(self, v: float) -> float:
        v = min(max(v, self.ylo), self.yhi)
        return self.top + (self.yhi - v) / (self.yhi - self.ylo) * (self.h - self.top - self.bottom)

    def _axes(self, ylabel: str) -> None:
        step = _nice_step((self.yhi - self.ylo) / 5)
        v = math.ceil(self.ylo / step) * step
        while v <= self.yhi + 1e-9:
            y = self.y(v)
            self.parts.append(f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{y:.1f}" y2="{y:.1f}" '
                              f'stroke="#e4e4e8"/><text x="{self.left - 6}" y="{y + 4:.1f}" '
                              f'text-anchor="end">{fmt(round(v, 6), 2 if step >= 0.01 else 3)}</text>')
            v += step
        self.parts.append(f'<line x1="{self.left}" x2="{self.left}" y1="{self.top}" y2="{self.h - self.bottom}" '
                          f'stroke="#999"/>')
        cy = (self.top + self.h - self.bottom) / 2
        self.parts.append(f'<text x="12" y="{cy:.1f}" transform="rotate(-90 12 {cy:.1f})" '
                          f'text-anchor="middle">{esc(ylabel)}</text>')

    def xlabel(self, f: float, text: str, full: str | None = None, rotate: bool = True) -> None:
        x, y = self.x(f), self.h - self.bottom + 14
        rot = f' transform="rotate(-30 {x:.1f} {y:.1f})"' if rotate else ""
        # Unrotated labels at the ends of the axis stay inside the picture.
        anchor = "end" if rotate or f >= 0.95 else ("start" if f <= 0.05 else "middle")
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{rot}>{esc(text)}'
                          f'<title>{esc(full or text)}</title></text>')

    def add(self, svg: str) -> None:
        self.parts.append(svg)

    def render(self) -> str:
        return (f'<svg class="plot" data-kind="{esc(self.kind)}" xmlns="http://www.w3.org/2000/svg" width="{self.w}" '
                f'height="{self.h}" viewBox="0 0 {self.w} {self.h}" role="img">' + "".join(self.parts) + "</svg>")


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 0.1
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _range(values: Iterable[float | None], lo_floor: float = -1.0, hi_cap: float = 1.0) -> tuple[float, float]:
    vs = [v for v in values if v is not None]
    if not vs:
        return 0.0, 1.0
    lo, hi = min(vs), max(vs)
    pad = max(0.02, (hi - lo) * 0.08)
    return max(lo_floor, lo - pad), min(hi_cap, hi + pad)


def _circle(x: float, y: float, r: float, color: str, tip: str, extra: str = "") -> str:
    return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}"{extra}><title>{esc(tip)}</title></circle>')


def settings_chart(evaluator: str, summary: Sequence[dict], subjects: Sequence[dict],
                   labels: dict[str, str], colors: dict[str, str]) -> str:
    """Mean (circle) with its 95 % interval (bar), median (tick) and each subject's average (small dots)."""
    rows = [r for r in summary if r["evaluator"] == evaluator]
    subj = [r for r in subjects if r["evaluator"] == evaluator]
    lo, hi = _range([r["ci_low"] for r in rows] + [r["ci_high"] for r in rows] + [r["mean"] for r in rows]
                    + [r["mean"] for r in subj])
    chart = _Chart(f"{evaluator}: per setting, mean and 95 % interval over subjects", lo, hi,
                   kind="settings")
    n = max(1, len(rows))
    for i, r in enumerate(rows):
        f = (i + 0.5) / n
        x, color, sid = chart.x(f), colors.get(r["setting_id"], "#333"), r["setting_id"]
        label = labels.get(sid, sid)
        for j, s in enumerate(x for x in subj if x["setting_id"] == sid):
            if s["mean"] is not None:
                dx = ((j % 7) - 3) * 3.0
                chart.add(_circle(x + 14 + dx, chart.y(s["mean"]), 2.2, "#9a9aa6",
                                  f"{s['subject_id']}: {fmt(s['mean'])} ({s['n_videos']} videos)"))
        if r["ci_low"] is not None:
            y1, y2 = chart.y(r["ci_low"]), chart.y(r["ci_high"])
            chart.add(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="2"/>'
                      f'<line x1="{x - 6:.1f}" x2="{x + 6:.1f}" y1="{y1:.1f}" y2="{y1:.1f}" stroke="{color}" stroke-width="2"/>'
                      f'<line x1="{x - 6:.1f}" x2="{x + 6:.1f}" y1="{y2:.1f}" y2="{y2:.1f}" stroke="{color}" stroke-width="2"/>')
        if r["median"] is not None:
            ym = chart.y(r["median"])
            chart.add(f'<line x1="{x - 9:.1f}" x2="{x - 3:.1f}" y1="{ym:.1f}" y2="{ym:.1f}" stroke="#333" stroke-width="2">'
                      f'<title>median {fmt(r["median"])}</title></line>')
        if r["mean"] is not None:
            ci = (f", 95 % interval {fmt(r['ci_low'])} to {fmt(r['ci_high'])}" if r["ci_low"] is not None
                  else ", no interval (fewer than 2 subjects)")
            chart.add(_circle(x, chart.y(r["mean"]), 5, color,
                              f"{label}: mean {fmt(r['mean'])} over {r['n_subjects']} subjects{ci}", ' class="mean"'))
        chart.xlabel(f, _short(label), label)
    return chart.render()


def subjects_chart(evaluator: str, subjects: Sequence[dict], labels: dict[str, str], colors: dict[str, str]) -> str:
    """Each subject's average per setting (one colour per setting)."""
    rows = [r for r in subjects if r["evaluator"] == evaluator]
    ids = sorted({r["subject_id"] for r in rows})
    settings = sorted({r["setting_id"] for r in rows})
    lo, hi = _range(r["mean"] for r in rows)
    chart = _Chart(f"{evaluator}: resemblance per subject", lo, hi, width=max(600, 40 * len(ids) + 80),
                   kind="subjects")
    n, k = max(1, len(ids)), max(1, len(settings))
    for i, sid in enumerate(ids):
        f = (i + 0.5) / n
        for r in (r for r in rows if r["subject_id"] == sid):
            j = settings.index(r["setting_id"])
            dx = (j - (k - 1) / 2) * min(6.0, 24.0 / k)
            if r["mean"] is not None:
                chart.add(_circle(chart.x(f) + dx, chart.y(r["mean"]), 3.5, colors.get(r["setting_id"], "#333"),
                                  f"{sid}, {labels.get(r['setting_id'], r['setting_id'])}: {fmt(r['mean'])} "
                                  f"({r['n_videos']} videos, {r['videos_no_face']} without a face)"))
        chart.xlabel(f, _short(sid, 16), sid)
    return chart.render()


def frames_chart(evaluator: str, curves: Sequence[dict], labels: dict[str, str], colors: dict[str, str]) -> str:
    """The mean over videos at each frame index, one line per setting."""
    rows = [c for c in curves if c["evaluator"] == evaluator]
    frames = [p["frame"] for c in rows for p in c["points"]]
    lo, hi = _range(p["mean"] for c in rows for p in c["points"])
    chart = _Chart(f"{evaluator}: resemblance over frames (mean per setting)", lo, hi, bottom=40, kind="frames")
    fmax = max(frames) if frames else 1
    span = fmax if fmax > 0 else 1

    def fx(frame: int) -> float:
        return frame / span if fmax > 0 else 0.5

    for t in sorted({0, fmax // 2, fmax}):
        chart.xlabel(fx(t), f"frame {t}", rotate=False)
    for c in rows:
        color = colors.get(c["setting_id"], "#333")
        pts = [(chart.x(fx(p["frame"])), chart.y(p["mean"])) for p in c["points"] if p["mean"] is not None]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            chart.add(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{path}">'
                      f'<title>{esc(labels.get(c["setting_id"], c["setting_id"]))}</title></polyline>')
        for p in c["points"]:
            if p["mean"] is not None:
                chart.add(_circle(chart.x(fx(p["frame"])), chart.y(p["mean"]), 2, color,
                                  f"{labels.get(c['setting_id'], c['setting_id'])}, frame {p['frame']}: "
                                  f"{fmt(p['mean'])} over {p['n']} videos ({p['no_face']} without a face)"))
            if p["no_face"]:
                x = chart.x(fx(p["frame"]))
                chart.add(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{chart.h - chart.bottom - 6}" '
                          f'y2="{chart.h - chart.bottom}" stroke="#c00" stroke-width="1.5"/>')
    return chart.render()


def missing_chart(summary: Sequence[dict], labels: dict[str, str], colors: dict[str, str], evaluator: str) -> str:
    """Share of scored frames without a face, per setting."""
    rows = [r for r in summary if r["evaluator"] == evaluator]
    top = max([r["face_missing_rate"] or 0.0 for r in rows] + [0.05])
    chart = _Chart(f"{evaluator}: frames without a face", 0.0, min(1.0, top * 1.15), ylabel="share of frames",
                   kind="missing")
    n = max(1, len(rows))
    for i, r in enumerate(rows):
        f = (i + 0.5) / n
        x, rate = chart.x(f), r["face_missing_rate"] or 0.0
        bw = min(40.0, (chart.w - chart.left - chart.right) / n * 0.6)
        y0, y1 = chart.y(0.0), chart.y(rate)
        label = labels.get(r["setting_id"], r["setting_id"])
        chart.add(f'<rect x="{x - bw / 2:.1f}" y="{y1:.1f}" width="{bw:.1f}" height="{max(0.5, y0 - y1):.1f}" '
                  f'fill="{colors.get(r["setting_id"], "#333")}"><title>{esc(label)}: {r["frames_no_face"]} of '
                  f'{r["frames_total"]} frames, {r["videos_no_face"]} videos without any face</title></rect>')
        chart.xlabel(f, _short(label), label)
    return chart.render()


def diff_chart(evaluator: str, rows: Sequence[dict]) -> str:
    """Comparison: B - A per matched setting, paired over subjects, with the 95 % interval."""
    rows = [r for r in rows if r["evaluator"] == evaluator]
    lo, hi = _range([r["diff"] for r in rows] + [r["diff_ci_low"] for r in rows] + [r["diff_ci_high"] for r in rows]
                    + [0.0], -2.0, 2.0)
    chart = _Chart(f"{evaluator}: B − A per setting (paired by subject, 95 % interval)", lo, hi,
                   ylabel="difference of cosine", kind="diff")
    y0 = chart.y(0.0)
    chart.add(f'<line x1="{chart.left}" x2="{chart.w - chart.right}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#555" '
              f'stroke-dasharray="4 3"/>')
    n = max(1, len(rows))
    for i, r in enumerate(rows):
        f = (i + 0.5) / n
        x = chart.x(f)
        if r["diff_ci_low"] is not None:
            chart.add(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{chart.y(r["diff_ci_low"]):.1f}" '
                      f'y2="{chart.y(r["diff_ci_high"]):.1f}" stroke="{PALETTE[0]}" stroke-width="2"/>')
        if r["diff"] is not None:
            chart.add(_circle(x, chart.y(r["diff"]), 5, PALETTE[0],
                              f"{r['label']}: {fmt(r['diff'])} over {r['n_paired']} paired subjects", ' class="mean"'))
        chart.xlabel(f, _short(r["label"]), r["label"])
    return chart.render()


# ---- page parts ------------------------------------------------------------------------------------

def table(table_id: str, columns: Sequence[tuple[str, str]], rows: Iterable[dict], numeric: set[str] = frozenset(),
          bad=None, cells=None) -> str:
    """A sortable table; ``columns`` are (key, heading); ``cells(key, row)`` may return ready HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for _k, h in columns)
    body = []
    for r in rows:
        tds = []
        for k, _h in columns:
            custom = cells(k, r) if cells else None
            if custom is not None:
                tds.append(custom)
                continue
            v = r.get(k)
            cls = ' class="num"' if k in numeric else ""
            shown = pct(v) if "_rate" in k else fmt(v)
            # Numbers sort by their full value, not the rounded text shown.
            dv = f' data-v="{esc("" if v is None else v)}"' if k in numeric else ""
            tds.append(f"<td{cls}{dv}>{esc(shown)}</td>")
        cls = ' class="bad"' if bad and bad(r) else ""
        body.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    return (f'<table id="{esc(table_id)}" class="sortable"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table>")


def legend(settings: Sequence[dict], colors: dict[str, str]) -> str:
    items = "".join(f'<span><i class="sw" style="background:{colors[s["id"]]}"></i>{esc(s["id"])}: '
                    f'{esc(s.get("label", ""))}</span>' for s in settings if s["id"] in colors)
    return f'<p class="legend">{items}</p>'


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            # Nothing may load from elsewhere: the page is read offline and from untrusted studies.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}<script>{JS}</script></body></html>\n")


def setting_colors(settings: Sequence[dict]) -> dict[str, str]:
    return {s["id"]: PALETTE[i % len(PALETTE)] for i, s in enumerate(settings)}


SUMMARY_COLUMNS = [("setting_id", "setting"), ("label", "label"), ("evaluator", "evaluator"),
                   ("n_subjects", "subjects"), ("n_videos", "videos"), ("mean", "mean"), ("median", "median"),
                   ("ci_low", "95 % low"), ("ci_high", "95 % high"), ("video_mean", "mean of videos"),
                   ("videos_no_face", "videos w/o face"), ("frames_no_face", "frames w/o face"),
                   ("frames_total", "frames"), ("face_missing_rate", "face missing"),
                   ("stability_std", "frame std"), ("stability_iqr", "frame IQR")]
SUMMARY_NUMERIC = {k for k, _h in SUMMARY_COLUMNS if k not in ("setting_id", "label", "evaluator")}


def render_report(report: dict[str, Any], sheets: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The study report page. ``sheets``: (job_id, video) -> {"src": relative path, "frames": [...], ...}."""
    study = report["study"]
    settings = report["settings"]
    labels = {s["id"]: s.get("label") or s["id"] for s in settings}
    colors = setting_colors(settings)
    evaluators = list(report["evaluators"])
    jobs = report["jobs"]
    out = [f"<h1>Study report: {esc(study.get('name'))}</h1>",
           f'<p class="meta">{esc(jobs["done"])} of {esc(jobs["expected"])} jobs done, {esc(jobs["failed"])} failed, '
           f'{esc(jobs["scored"])} scored, {esc(jobs["unscored"])} done but not scored. Study file '
           f'{esc(study.get("study_file"))} (sha256 {esc(str(study.get("study_sha256"))[:12])}…). '
           f'Generated {esc(report["generated_at"])}.</p>',
           f'<p class="note">{esc(report["method"]["summary"])}</p>']
    for name, info in report["evaluators"].items():
        models = ", ".join(f"{m['model']} (sha256 {m['model_sha256'][:12]}…)" for m in info["models"])
        out.append(f'<p class="note"><b>{esc(name)}</b> v{esc(", ".join(info["versions"]))}: {esc(models)}; '
                   f'detector {esc(", ".join(info["detectors"]))}.'
                   + (' <b class="noface">Several model files were used for this evaluator: the numbers are not '
                      'comparable across them.</b>' if len(info["models"]) > 1 else "") + "</p>")
    out.append(legend(settings, colors))
    out.append('<h2 id="per-setting">Resemblance per setting</h2><div class="panels">'
               + "".join(f'<div class="panel">{settings_chart(e, report["summary"], report["per_subject"], labels, colors)}'
                         "</div>" for e in evaluators) + "</div>")
    summary_rows = [{**r, "label": labels.get(r["setting_id"], r["setting_id"])} for r in report["summary"]]
    out.append('<h3>Summary table</h3>' + table("summary", SUMMARY_COLUMNS, summary_rows, SUMMARY_NUMERIC))
    out.append('<h2 id="per-subject">Per subject</h2><div class="panels">'
               + "".join(f'<div class="panel">{subjects_chart(e, report["per_subject"], labels, colors)}</div>'
                         for e in evaluators) + "</div>")
    out.append('<h2 id="over-frames">Over frames</h2><p class="note">Red ticks at the bottom: frames where at least '
               'one video showed no face.</p><div class="panels">'
               + "".join(f'<div class="panel">{frames_chart(e, report["per_frame"], labels, colors)}</div>'
                         for e in evaluators) + "</div>")
    out.append('<h2 id="missing">Frames without a face</h2><div class="panels">'
               + "".join(f'<div class="panel">{missing_chart(report["summary"], labels, colors, e)}</div>'
                         for e in evaluators) + "</div>")
    out.append(_videos_section(report, labels))
    out.append(_sheet_section(report, sheets, labels))
    problems = report["unscored"] + report["failed"]
    if problems:
        out.append('<h2 id="problems">Jobs without a score</h2>'
                   + table("problems", [("job_id", "job"), ("status", "status"), ("reason", "why")], problems))
    return page(f"Study report: {study.get('name')}", "".join(out))


VIDEO_COLUMNS = [("job_id", "job"), ("setting_id", "setting"), ("subject_id", "subject"), ("prompt", "prompt"),
                 ("seed", "seed"), ("repeat", "repeat"), ("evaluator", "evaluator"), ("mean", "mean"),
                 ("frames_no_face", "frames w/o face"), ("frames_total", "frames"), ("std", "std"), ("iqr", "IQR"),
                 ("video", "video")]


def _videos_section(report: dict[str, Any], labels: dict[str, str]) -> str:
    numeric = {"seed", "repeat", "mean", "frames_no_face", "frames_total", "std", "iqr"}

    def cells(key: str, row: dict) -> str | None:
        if key == "video":
            href = "../" + quote(row["video"])  # server file names may hold spaces, '#' or '?'
            return f'<td><a href="{esc(href)}">{esc(row["video"].rsplit("/", 1)[-1])}</a></td>'
        if key == "mean" and row["mean"] is None:
            return '<td class="num noface" data-v="">no face</td>'
        return None

    return ('<h2 id="videos">Every video</h2>'
            '<input class="filter" data-table="videos" placeholder="filter rows (subject, prompt, setting...)">'
            '<div class="scroll">' + table("videos", VIDEO_COLUMNS, report["videos"], numeric,
                                          bad=lambda r: r["mean"] is None or r["frames_no_face"] > 0, cells=cells)
            + "</div>")


def _sheet_section(report: dict[str, Any], sheets: dict[tuple[str, str], dict[str, Any]], labels: dict[str, str]) -> str:
    first = next(iter(report["evaluators"]), None)
    scores = {(r["job_id"], r["video"]): r for r in report["videos"] if r["evaluator"] == first}
    items = []
    for (job_id, video), sheet in sheets.items():
        rec = scores.get((job_id, video))
        head = (f"<b>{esc(job_id)}</b> · {esc(labels.get(rec['setting_id'], rec['setting_id']) if rec else '')} · "
                f"{esc(rec['subject_id'] if rec else '')} · “{esc(rec['prompt'] if rec else '')}”")
        if sheet.get("src"):
            by_frame = dict(zip(rec["frame_indices"], rec["per_frame"])) if rec else {}
            caps = "".join(
                f'<span class="{"noface" if by_frame.get(i) is None else ""}">#{i}: '
                f'{esc("no face" if by_frame.get(i) is None else fmt(by_frame[i], 3))}</span>'
                for i in sheet["frames"])
            # The captions share the strip's width, so each sits under its frame.
            body = (f'<div style="width:{sheet["width"]}px;max-width:100%"><img loading="lazy" src="{esc(sheet["src"])}" '
                    f'width="{sheet["width"]}" height="{sheet["height"]}" alt="frames of {esc(job_id)}">'
                    f'<div class="frames">{caps}</div></div>')
        else:
            body = f'<p class="noface">{esc(sheet.get("error", "no frames"))}</p>'
        items.append(f'<div class="clip"><div>{head}</div>{body}</div>')
    note = (f"Frames of every video ({esc(first)} score under each frame)." if first else "No scores yet.")
    return f'<h2 id="contact-sheet">Contact sheet</h2><p class="note">{note}</p><div class="sheet">{"".join(items)}</div>'


COMPARE_COLUMNS = [("label", "setting"), ("evaluator", "evaluator"), ("mean_a", "A mean"), ("ci_a", "A 95 %"),
                   ("n_subjects_a", "A subjects"), ("mean_b", "B mean"), ("ci_b", "B 95 %"),
                   ("n_subjects_b", "B subjects"), ("n_paired", "paired subjects"), ("diff", "B − A (paired)"),
                   ("diff_ci", "95 % (paired)"), ("diff_unpaired", "B − A (all subjects)"),
                   ("welch_ci", "95 % (Welch)"), ("face_missing_rate_a", "A face missing"),
                   ("face_missing_rate_b", "B face missing")]


def _ci(lo: float | None, hi: float | None) -> str:
    return "" if lo is None else f"{lo:.4f} … {hi:.4f}"


def render_comparison(data: dict[str, Any]) -> str:
    a, b = data["a"], data["b"]
    rows = [{**r, "ci_a": _ci(r["ci_low_a"], r["ci_high_a"]), "ci_b": _ci(r["ci_low_b"], r["ci_high_b"]),
             "diff_ci": _ci(r["diff_ci_low"], r["diff_ci_high"]), "welch_ci": _ci(r["welch_low"], r["welch_high"])}
            for r in data["rows"]]
    numeric = {"mean_a", "mean_b", "n_subjects_a", "n_subjects_b", "n_paired", "diff", "diff_unpaired",
               "face_missing_rate_a", "face_missing_rate_b"}
    evaluators = sorted({r["evaluator"] for r in rows})
    out = [f"<h1>Comparison: {esc(a['name'])} (A) vs {esc(b['name'])} (B)</h1>",
           f'<p class="meta">A: {esc(a["dir"])}<br>B: {esc(b["dir"])}<br>Generated {esc(data["generated_at"])}.</p>',
           f'<p class="note">{esc(data["method"])}</p>']
    for w in data["warnings"]:
        out.append(f'<p class="note noface">{esc(w)}</p>')
    out.append('<div class="panels">' + "".join(f'<div class="panel">{diff_chart(e, data["rows"])}</div>'
                                                for e in evaluators) + "</div>")
    out.append("<h2>Matched settings</h2>" + table("comparison", COMPARE_COLUMNS, rows, numeric))
    if data["unmatched"]:
        out.append("<h2>Settings without a partner</h2>"
                   + table("unmatched", [("study", "study"), ("setting_id", "setting"), ("label", "label")],
                           data["unmatched"]))
    if data["per_subject"]:
        out.append("<h2>Per subject (paired)</h2>"
                   + table("pairs", [("label", "setting"), ("evaluator", "evaluator"), ("subject_id", "subject"),
                                     ("mean_a", "A"), ("mean_b", "B"), ("diff", "B − A")], data["per_subject"],
                           {"mean_a", "mean_b", "diff"}))
    return page(f"Comparison: {a['name']} vs {b['name']}", "".join(out))
