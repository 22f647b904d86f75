"""What became of each job: the summary table and report.json."""
import json
from dataclasses import dataclass, field
from pathlib import Path

from .files import numbered_with_counter, write_new_file
from .inputs import Job

REPORT_NAME = "report.json"
# Final states, in the order the summary counts them. "ok" and "failed" are always counted.
FINAL_STATES = {
    "ok": "finished on the server; its files are downloaded",
    "failed": "rejected or failed on the server (error says why)",
    "interrupted": "stopped on the server by Ctrl-C",
    "removed": "taken off the server queue by Ctrl-C before it ran",
    "not_run": "never sent to the server (the batch stopped before)",
    "unknown": "sent, but the tool stopped following it (server gone, or Ctrl-C twice)",
}


@dataclass
class JobResult:
    job: Job
    status: str = "pending"  # pending | queued | running, then one of FINAL_STATES
    prompt_id: str | None = None
    error: str | None = None
    outputs: list[Path] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    interrupt_sent: bool = False  # by --timeout
    cancel: str | None = None  # what Ctrl-C asked the server: "interrupt" | "remove"

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATES


def format_summary(results: list[JobResult]) -> str:
    """A plain-text table: one row per job, then the totals."""
    rows = [("#", "status", "face", "seed", "time", "result")]
    for r in results:
        face = r.job.face.name if r.job.face else "-"
        secs = f"{r.seconds:.1f}s" if r.seconds is not None and r.status == "ok" else ""
        what = ", ".join(p.name for p in r.outputs) if r.status == "ok" else (r.error or "")
        rows.append((str(r.job.index), r.status, face, "" if r.job.seed is None else str(r.job.seed), secs,
                     what.replace("\n", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5] for row in rows]
    counts = [(state, sum(r.status == state for r in results)) for state in FINAL_STATES]
    parts = [f"{n} {state.replace('_', ' ')}" for state, n in counts if n or state in ("ok", "failed")]
    lines.append(", ".join(parts) + f", {len(results)} jobs")
    return "\n".join(lines)


def report_records(results: list[JobResult]) -> list[dict]:
    return [{
        "index": r.job.index, "status": r.status, "prompt": r.job.prompt, "negative": r.job.negative,
        "seed": r.job.seed, "face": str(r.job.face) if r.job.face else None, "prompt_id": r.prompt_id,
        "error": r.error, "outputs": [str(p) for p in r.outputs],
        "seconds": None if r.seconds is None else round(r.seconds, 3),
    } for r in results]


def write_report(results: list[JobResult], folder: Path) -> Path:
    """Write report.json into folder, atomically; an existing report is never replaced: the next
    run's goes to report_0001.json, then report_0002.json... Returns the path written."""
    text = json.dumps(report_records(results), indent=2, ensure_ascii=False) + "\n"
    return write_new_file(folder, REPORT_NAME, text.encode("utf-8"), numbered_with_counter)
