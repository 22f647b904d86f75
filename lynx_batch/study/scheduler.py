"""Which job goes to which server, and what happens when a server goes away. No I/O here: the
runner reports what the servers did and asks what to send next, so every rule is testable alone.

A server is ``up`` (gets jobs up to its capacity), ``suspect`` (stopped answering a moment ago:
keeps its jobs, gets no new ones), ``down`` (its unfinished jobs went back to the others; it is
tried again after a backoff that doubles up to a limit) or ``disabled`` (it cannot run this
workflow; not tried again in this run).
"""
from collections import deque
from dataclasses import dataclass, field

UP, SUSPECT, DOWN, DISABLED = "up", "suspect", "down", "disabled"


@dataclass
class ServerState:
    name: str
    capacity: int
    state: str = UP
    in_flight: dict[str, str | None] = field(default_factory=dict)  # job id -> prompt id (None until sent)
    retry_at: float = 0.0
    backoff: float = 0.0
    why: str = ""  # the last problem, for progress lines and the run record
    done: int = 0
    failed: int = 0
    lost: int = 0  # jobs taken back from it (it died or lost its queue)

    @property
    def room(self) -> int:
        return self.capacity - len(self.in_flight) if self.state == UP else 0


class Scheduler:
    def __init__(self, job_ids: list[str], servers: list[str], capacity: int,
                 backoff_start: float = 5.0, backoff_max: float = 120.0, max_lost: int = 3) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if len(set(servers)) != len(servers) or not servers:
            raise ValueError("give one or more distinct servers")
        self.pending: deque[str] = deque(job_ids)
        self.servers = {name: ServerState(name, capacity, backoff=backoff_start) for name in servers}
        self.backoff_start, self.backoff_max, self.max_lost = backoff_start, backoff_max, max_lost
        self.lost_count: dict[str, int] = {}  # job id -> times a server was lost under it
        self.where: dict[str, str] = {}  # job id -> server it is on

    # -- what to send -------------------------------------------------------------------------
    def next_assignments(self) -> list[tuple[str, str]]:
        """(server, job id) pairs to send now; they count as in flight at once. The server with
        the most room gets the next job, so work spreads evenly over free servers."""
        out = []
        while self.pending:
            free = [s for s in self.servers.values() if s.room > 0]
            if not free:
                break
            server = max(free, key=lambda s: s.room)  # max() keeps the first on ties: the --server order
            job = self.pending.popleft()
            server.in_flight[job] = None
            self.where[job] = server.name
            out.append((server.name, job))
        return out

    def submitted(self, server: str, job: str, prompt_id: str) -> None:
        self.servers[server].in_flight[job] = prompt_id

    def not_sent(self, server: str, job: str) -> None:
        """Sending failed for a reason that is not the job's: it goes first in line again."""
        if self._release(job) is not None:  # not when a disable or a down already put it back
            self.pending.appendleft(job)

    # -- what came back ------------------------------------------------------------------------
    def finished(self, job: str, ok: bool) -> None:
        server = self._release(job)
        if server is not None:
            if ok:
                server.done += 1
            else:
                server.failed += 1

    def lost(self, job: str) -> bool:
        """The server no longer has this job (it restarted and lost its queue). Back in line unless it
        was lost too often (a job that kills its server would kill them all): returns False then."""
        server = self._release(job)
        if server is None:
            return True  # already back in line
        server.lost += 1
        self.lost_count[job] = self.lost_count.get(job, 0) + 1
        if self.lost_count[job] >= self.max_lost:
            return False
        self.pending.appendleft(job)
        return True

    # -- server health --------------------------------------------------------------------------
    def suspect(self, name: str, why: str) -> None:
        s = self.servers[name]
        if s.state == UP:
            s.state, s.why = SUSPECT, why

    def answered(self, name: str) -> None:
        s = self.servers[name]
        if s.state == SUSPECT:
            s.state, s.why = UP, ""

    def down(self, name: str, now: float, why: str) -> list[str]:
        """The server is gone: its unfinished jobs go back in line (first); returns them. Jobs lost
        this way too often are returned too but not put back (see ``given_up``)."""
        s = self.servers[name]
        jobs = list(s.in_flight)
        for job in reversed(jobs):
            self.lost(job)
        s.state, s.why = DOWN, why
        s.retry_at = now + s.backoff
        s.backoff = min(self.backoff_max, s.backoff * 2)
        return jobs

    def given_up(self, job: str) -> bool:
        return self.lost_count.get(job, 0) >= self.max_lost

    def due_for_retry(self, now: float) -> list[str]:
        return [s.name for s in self.servers.values() if s.state == DOWN and now >= s.retry_at]

    def retry_failed(self, name: str, now: float, why: str) -> None:
        s = self.servers[name]
        s.why = why
        s.retry_at = now + s.backoff
        s.backoff = min(self.backoff_max, s.backoff * 2)

    def back_up(self, name: str) -> None:
        s = self.servers[name]
        s.state, s.why, s.backoff = UP, "", self.backoff_start

    def disable(self, name: str, why: str) -> list[str]:
        """The server cannot run the workflow: its jobs go to the others, for good."""
        s = self.servers[name]
        jobs = list(s.in_flight)
        for job in reversed(jobs):
            self._release(job)
            self.pending.appendleft(job)
        s.state, s.why = DISABLED, why
        return jobs

    # -- where we stand -------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self.servers.values())

    @property
    def all_finished(self) -> bool:
        return not self.pending and self.in_flight == 0

    @property
    def all_dead(self) -> bool:
        """No server can take or finish a job: the run has to stop."""
        return all(s.state in (DOWN, DISABLED) for s in self.servers.values())

    def _release(self, job: str) -> ServerState | None:
        name = self.where.pop(job, None)
        if name is None:
            return None
        server = self.servers[name]
        server.in_flight.pop(job, None)
        return server
