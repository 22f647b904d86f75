"""Progress lines on stderr: one status line per job on a terminal, sparse lines elsewhere (logs, CI)."""
from typing import TextIO

from .report import JobResult


class Progress:
    """One status line per job on a terminal; sparse lines elsewhere (logs, CI)."""

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream = stream
        self.total = total
        self.tty = stream.isatty()
        self._last: dict[str, int] = {}
        self._open_line = False

    def line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, result: JobResult, node: str, value: int, maximum: int) -> None:
        head = f"[{result.job.index}/{self.total}] {node} {value}/{maximum}"
        if self.tty:
            self.stream.write("\r" + head.ljust(60))
            self.stream.flush()
            self._open_line = True
            return
        pct = int(100 * value / maximum) if maximum else 100
        key = f"{result.prompt_id}:{node}"
        if pct >= self._last.get(key, -100) + 25 or value == maximum:
            self._last[key] = pct
            self.line(head)


class NullStream:
    """Where progress goes with --quiet."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
