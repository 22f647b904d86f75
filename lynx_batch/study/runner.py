"""Run a study's jobs over many ComfyUI servers: send, follow, download, record; resume on a rerun.

The runner asks the :class:`~.scheduler.Scheduler` what to send where and tells it what the servers
did. It follows jobs by polling ``/queue`` (only the prompts sent with this run's client_id) and
``/history``: with many servers a websocket each buys nothing but step progress. A job ends in
``jobs/<job_id>.json`` (done or failed); a job that did not end (Ctrl-C, every server gone) has no
record and runs on the next run of the same command.
"""
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TextIO

from ..errors import JobError, PromptRejected, QueueError, ServerGone
from ..files import write_new_file
from ..server_errors import format_prompt_error, history_error, is_workflow_error, output_files, was_interrupted
from . import studydir
from .grid import StudyJob, job_workflow, make_jobs, setting_inputs
from .scheduler import SUSPECT, UP, Scheduler
from .studyfile import Study, StudyError, workflow_sha256

EXIT_OK, EXIT_FAILED, EXIT_NOT_STARTED, EXIT_ALL_DEAD, EXIT_CTRL_C = 0, 1, 2, 3, 130
REINTERRUPT_S = 2.0  # ComfyUI drops an interrupt that lands just before a prompt starts: resend


class Client(Protocol):
    """What the runner needs of a server (ComfyClient has it; the tests' fake servers too)."""
    base: str

    def check(self) -> Any: ...
    def upload_image(self, path: Path) -> str: ...
    def queue_prompt(self, workflow: dict[str, Any], client_id: str) -> str: ...
    def queue_state(self, client_id: str | None = None) -> tuple[set[str], set[str]]: ...
    def history(self, prompt_id: str) -> dict[str, Any] | None: ...
    def view(self, info: dict[str, Any]) -> bytes: ...
    def interrupt(self, prompt_id: str) -> None: ...
    def delete_queued(self, prompt_ids: list[str]) -> None: ...


@dataclass
class RunOptions:
    per_server: int = 2  # prompts queued at once on one server: 1 running + 1 waiting
    poll_interval: float = 1.0
    server_grace: float = 30.0  # a server silent this long is down: its jobs go to the others
    lost_after: float = 5.0  # our prompt is neither queued nor in /history this long: the server lost it
    retry_failed: bool = True  # a rerun runs failed jobs again
    cancel_wait: float = 30.0  # after Ctrl-C, how long to wait for the servers to confirm
    max_lost: int = 3  # a job whose server is lost this often is recorded failed (it may be what kills them)
    backoff_start: float = 5.0
    backoff_max: float = 120.0
    force_new: bool = False


@dataclass
class RunOutcome:
    total: int
    skipped: int  # done in earlier runs
    done: int  # done, this run and before
    failed: int
    left: int  # neither done nor failed: they run on the next run
    stopped: str | None = None
    cancelled: bool = False
    all_dead: bool = False
    run_record: Path | None = None

    @property
    def exit_code(self) -> int:
        if self.cancelled:
            return EXIT_CTRL_C
        if self.all_dead:
            return EXIT_ALL_DEAD
        return EXIT_OK if self.done == self.total else EXIT_FAILED


def short_name(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _fmt_eta(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class StudyRunner:
    def __init__(self, study: Study, folder: Path, clients: list[Client], opts: RunOptions, stream: TextIO,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 wall: Callable[[], float] = time.time) -> None:
        names = [c.base for c in clients]
        if len(set(names)) != len(names):
            raise StudyError("--server: a server is given twice; give each one once")
        self.study, self.folder, self.opts, self.stream = study, folder, opts, stream
        self.clock, self.sleep, self.wall = clock, sleep, wall
        self.clients = {c.base: c for c in clients}
        self.jobs = {j.job_id: j for j in make_jobs(study)}
        self.client_id = uuid.uuid4().hex  # marks our prompts in every server's queue
        self.job_inputs = study.targets.job_inputs() | setting_inputs(study.settings)
        self.uploaded: dict[tuple[str, Path], str] = {}
        self.missing: dict[tuple[str, str], float] = {}
        self.unreachable: dict[str, float] = {}
        self.queued_at: dict[str, float] = {}
        self.started_at: dict[str, float] = {}
        self.sent_sha: dict[str, str] = {}
        self.downloaded: dict[str, dict[tuple, str]] = {}
        self.interrupt_at: dict[str, float] = {}
        self.ended: dict[str, str] = {}  # job id -> "done" | "failed", this run
        self.ctrl_c = 0
        self.cancelling = False
        self.sched: Scheduler | None = None
        self.t0 = 0.0
        self.skipped = 0
        self.failed_before = 0

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        self.folder.mkdir(parents=True, exist_ok=True)
        with studydir.Lock(self.folder):
            studydir.prepare(self.study, self.folder, self.opts.force_new, self.wall())
            return self._run_locked()

    def _run_locked(self) -> RunOutcome:
        started = self.wall()
        todo = []
        for job_id in self.jobs:
            record = studydir.read_record(self.folder, job_id)
            if studydir.is_done(self.folder, record):
                self.skipped += 1
            elif record and record.get("status") == "failed" and not self.opts.retry_failed:
                self.failed_before += 1
            else:
                todo.append(job_id)
        opts = self.opts
        self.sched = Scheduler(todo, list(self.clients), opts.per_server, opts.backoff_start, opts.backoff_max,
                               opts.max_lost)
        self.t0 = self.clock()
        self._line(f"study '{self.study.name}': {len(self.jobs)} jobs, {self.skipped} done earlier"
                   + (f", {self.failed_before} failed earlier (not retried: --no-retry-failed)"
                      if self.failed_before else "") + f", {len(todo)} to run on {len(self.clients)} server(s)")
        all_dead = False
        if todo:
            self._check_servers()
        try:
            while todo:
                try:
                    if self.ctrl_c:
                        self._cancel()
                        break
                    self._retry_servers()
                    self._submit()
                    self._poll_all()
                    if self.sched.all_finished:
                        break
                    if self.sched.all_dead:
                        all_dead = True
                        break
                    self.sleep(opts.poll_interval)
                except KeyboardInterrupt:
                    self.ctrl_c += 1
                    if self.ctrl_c > 1:
                        break  # Ctrl-C again while waiting for the servers: stop waiting
                except OSError as e:  # the study folder cannot be written (disk full...): stop sending
                    self._abandon()
                    raise StudyError(f"--out: cannot write into {self.folder} ({e.strerror or e}); our prompts "
                                     "were taken off the servers. Free some space and run the same command "
                                     "again to resume") from None
        finally:
            outcome = self._outcome(all_dead)
            outcome.run_record = studydir.write_run_record(self.folder, self._run_record(started, outcome))
        return outcome

    def _outcome(self, all_dead: bool) -> RunOutcome:
        done = self.skipped + sum(s == "done" for s in self.ended.values())
        failed = self.failed_before + sum(s == "failed" for s in self.ended.values())
        total = len(self.jobs)
        left = total - done - failed
        outcome = RunOutcome(total=total, skipped=self.skipped, done=done, failed=failed, left=left,
                             cancelled=self.ctrl_c > 0, all_dead=all_dead and not self.ctrl_c)
        resume = "run the same command again to resume: finished jobs are skipped"
        if outcome.cancelled:
            still = self.sched.in_flight if self.sched else 0
            extra = f"; {still} job(s) were not confirmed stopped and may still run on their server" if still else ""
            outcome.stopped = f"stopped by Ctrl-C with {left} job(s) left{extra}; {resume}"
        elif outcome.all_dead:
            why = "; ".join(f"{short_name(s.name)}: {s.why}" for s in self.sched.servers.values())
            outcome.stopped = (f"every server is gone ({why}); {done} of {total} jobs done, {left} left. "
                               f"Start the servers (or give others with --server) and {resume}")
        return outcome

    def _run_record(self, started: float, o: RunOutcome) -> dict[str, Any]:
        servers = {}
        for s in (self.sched.servers.values() if self.sched else []):
            servers[s.name] = {"state": s.state, "done": s.done, "failed": s.failed, "lost": s.lost,
                               "problem": s.why or None}
        return {"started": studydir.utc_iso(started), "finished": studydir.utc_iso(self.wall()),
                "client_id": self.client_id, "study_file": str(self.study.study_file), "servers": servers,
                "jobs": o.total, "done": o.done, "failed": o.failed, "left": o.left,
                "skipped_done_earlier": o.skipped, "ended_this_run": dict(sorted(self.ended.items())),
                "stopped": o.stopped, "exit_code": o.exit_code}

    # -- servers ------------------------------------------------------------------------------
    def _check_servers(self) -> None:
        now = self.clock()
        bad = []
        for name, client in self.clients.items():
            try:
                client.check()
            except QueueError as e:  # ServerGone, or something that is not ComfyUI
                bad.append(f"{name}: {e}")
                self.sched.down(name, now, getattr(e, "reason", str(e)))
        if len(bad) == len(self.clients):
            raise StudyError("no server answers: " + "; ".join(bad))
        for b in bad:
            self._line(f"server {b}; the others start, it is tried again later")

    def _retry_servers(self) -> None:
        for name in self.sched.due_for_retry(self.clock()):
            client = self.clients[name]
            try:
                client.check()
                # Ours still on it were given to other servers when it went down: take them off.
                running, waiting = client.queue_state(self.client_id)
                client.delete_queued(sorted(waiting))
                for pid in sorted(running):
                    client.interrupt(pid)
            except QueueError as e:
                self.sched.retry_failed(name, self.clock(), getattr(e, "reason", str(e)))
                continue
            self.sched.back_up(name)
            self.unreachable.pop(name, None)
            self._line(f"server {short_name(name)} answers again: it gets jobs again"
                       + (f" (took {len(running) + len(waiting)} stale prompt(s) of ours off it)"
                          if running or waiting else ""))

    def _unreachable(self, name: str, e: ServerGone) -> None:
        now = self.clock()
        since = self.unreachable.setdefault(name, now)
        if since == now and self.sched.servers[name].state == UP:
            self.sched.suspect(name, e.reason)
            self._line(f"server {short_name(name)} does not answer ({e.reason}); no new jobs for it, "
                       f"waiting up to {self.opts.server_grace:g} s")
        if now - since >= self.opts.server_grace:
            self._server_down(name, f"stopped answering ({e.reason})")

    def _server_down(self, name: str, why: str) -> None:
        jobs = self.sched.down(name, self.clock(), why)
        self.unreachable.pop(name, None)
        self._forget_server(name)
        s = self.sched.servers[name]
        self._line(f"server {short_name(name)} is down ({why}): {len(jobs)} unfinished job(s) go to the other "
                   f"servers; trying it again in {s.retry_at - self.clock():.0f} s")
        for job_id in jobs:
            if self.sched.given_up(job_id):
                self._record(job_id, name, None, "failed",
                             f"its server was lost {self.opts.max_lost} times while it ran (does it crash the "
                             "server? look at the server log); run the study again to retry it")

    def _forget_server(self, name: str) -> None:
        for key in [k for k in self.uploaded if k[0] == name]:
            del self.uploaded[key]  # a restarted server may be a fresh machine: upload again
        for key in [k for k in self.missing if k[0] == name]:
            del self.missing[key]

    # -- sending ------------------------------------------------------------------------------
    def _submit(self) -> None:
        for name, job_id in self.sched.next_assignments():
            if self.sched.servers[name].state != UP:  # it failed earlier in this round
                self.sched.not_sent(name, job_id)
                continue
            job, client = self.jobs[job_id], self.clients[name]
            try:
                key = (name, job.subject.face)
                if key not in self.uploaded:
                    self.uploaded[key] = client.upload_image(job.subject.face)
                wf = job_workflow(self.study, job, self.uploaded[key])
                self.sent_sha[job_id] = workflow_sha256(wf)
                self.queued_at[job_id] = self.wall()
                pid = client.queue_prompt(wf, self.client_id)
            except ServerGone as e:
                self.sched.not_sent(name, job_id)
                self._unreachable(name, e)
                continue
            except PromptRejected as e:
                if is_workflow_error(e.data, self.job_inputs):
                    self.sched.not_sent(name, job_id)
                    why = f"cannot run this workflow: {format_prompt_error(e.data, self.study.workflow)}"
                    moved = self.sched.disable(name, why)
                    self._line(f"server {short_name(name)} {why}; it gets no more jobs in this run "
                               f"({len(moved)} job(s) moved to the others). Install what it lacks and run again")
                    continue
                self.sched.finished(job_id, ok=False)
                self._record(job_id, name, None, "failed", str(e))
                continue
            except JobError as e:
                self.sched.finished(job_id, ok=False)
                self._record(job_id, name, None, "failed", str(e))
                continue
            self.sched.submitted(name, job_id, pid)

    # -- following ----------------------------------------------------------------------------
    def _poll_all(self) -> None:
        for name, s in self.sched.servers.items():
            if s.state == SUSPECT or (s.state == UP and s.in_flight):
                try:
                    self._poll(name)
                except ServerGone as e:
                    self._unreachable(name, e)

    def _poll(self, name: str) -> None:
        client, s = self.clients[name], self.sched.servers[name]
        running, waiting = client.queue_state(self.client_id)
        self.unreachable.pop(name, None)
        self.sched.answered(name)
        now = self.clock()
        sent = {job_id: pid for job_id, pid in s.in_flight.items() if pid is not None}
        gone = []
        for job_id, pid in sent.items():
            if pid in running:
                self.started_at.setdefault(job_id, self.wall())
            elif pid not in waiting:
                entry = client.history(pid)
                if entry is None:
                    gone.append((job_id, pid, now - self.missing.setdefault((name, pid), now)))
                    continue
                self.missing.pop((name, pid), None)
                self._finish(name, job_id, pid, entry)
        for job_id, pid, age in gone:
            if age < self.opts.lost_after:
                continue
            # Neither queued nor in /history: the server restarted (a restart loses the queue and the
            # history) or someone took it off the queue. Either way it will not run there.
            self.missing.pop((name, pid), None)
            self._forget_server(name)
            if self.sched.lost(job_id):
                self._line(f"job {job_id}: {short_name(name)} no longer has it (the server restarted, or it was "
                           "taken off its queue); back in line")
            else:
                self._record(job_id, name, pid, "failed",
                             f"lost by its server {self.opts.max_lost} times (does it crash the server? look at "
                             "the server log); run the study again to retry it")

    def _finish(self, name: str, job_id: str, pid: str, entry: dict[str, Any]) -> None:
        error = history_error(entry)
        if was_interrupted(entry):
            if self.cancelling:
                self.sched.not_sent(name, job_id)  # our Ctrl-C stopped it: not an end, it runs next time
                return
            error = ("interrupted on the server (someone pressed Cancel in ComfyUI, or another client "
                     "interrupted it); it runs again on a rerun")
        videos: list[str] = []
        if not error:
            files = output_files(entry)
            if not files:
                error = ("the workflow saved no output file; end it with a node that saves the video "
                         "(e.g. Lynx Video Combine)")
            try:
                videos = self._download(name, job_id, files)
            except JobError as e:
                error = str(e)
            except OSError as e:
                error = f"cannot write the download into {self.folder / 'videos'} ({e.strerror or e})"
        self.sched.finished(job_id, ok=not error)
        self._record(job_id, name, pid, "failed" if error else "done", error, videos)

    def _download(self, name: str, job_id: str, files: list[dict[str, Any]]) -> list[str]:
        """Fetch every output of the job into videos/<job_id>/; files fetched before a server hiccup
        are not fetched twice (the job is finished again on the next poll)."""
        folder = self.folder / "videos" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        got = self.downloaded.setdefault(job_id, {})
        for info in files:
            key = (info.get("type", "output"), info.get("subfolder", ""), info["filename"])
            if key not in got:
                data = self.clients[name].view(info)  # ServerGone goes up: the server is looked after
                path = write_new_file(folder, Path(info["filename"]).name, data)
                got[key] = path.relative_to(self.folder).as_posix()
        return [got[(i.get("type", "output"), i.get("subfolder", ""), i["filename"])] for i in files]

    # -- Ctrl-C -------------------------------------------------------------------------------
    def _cancel(self) -> None:
        """Take our waiting prompts off every server and interrupt our running ones, then wait (up
        to cancel_wait) until the servers confirm. Jobs that finish meanwhile are kept."""
        self.cancelling = True
        self.sched.pending.clear()
        self._line("Ctrl-C: taking our waiting jobs off every server and interrupting our running ones "
                   f"(waiting up to {self.opts.cancel_wait:g} s for the servers; Ctrl-C again stops waiting)")
        deadline = self.clock() + self.opts.cancel_wait
        first = True
        while first or (self.sched.in_flight and self.clock() < deadline):
            for name, s in self.sched.servers.items():
                # Every server that may hold a prompt of ours, once; then those we still wait for.
                if not (s.in_flight or (first and s.state in (UP, SUSPECT))):
                    continue
                client = self.clients[name]
                try:
                    running, waiting = client.queue_state(self.client_id)
                    if waiting:
                        client.delete_queued(sorted(waiting))
                    now = self.clock()
                    for pid in sorted(running):
                        if now - self.interrupt_at.get(pid, -1e9) >= REINTERRUPT_S:
                            self.interrupt_at[pid] = now
                            client.interrupt(pid)
                    for job_id, pid in list(s.in_flight.items()):
                        if pid is None:
                            self.sched.not_sent(name, job_id)
                        elif pid not in running and pid not in waiting:
                            entry = client.history(pid)
                            if entry is None:
                                self.sched.not_sent(name, job_id)  # taken off the queue before it ran
                            else:
                                self._finish(name, job_id, pid, entry)
                except ServerGone:
                    for job_id in list(s.in_flight):
                        self.sched.not_sent(name, job_id)  # nothing to stop there any more
            first = False
            if self.sched.in_flight:
                self.sleep(min(0.5, self.opts.poll_interval))
        self.sched.pending.clear()

    def _abandon(self) -> None:
        """One pass of taking our prompts off every server that answers, whatever else fails."""
        for name, s in self.sched.servers.items():
            try:
                running, waiting = self.clients[name].queue_state(self.client_id)
                self.clients[name].delete_queued(sorted(waiting))
                for pid in sorted(running):
                    self.clients[name].interrupt(pid)
            except QueueError:
                pass
            for job_id in list(s.in_flight):
                self.sched.not_sent(name, job_id)

    # -- records and progress -----------------------------------------------------------------
    def _record(self, job_id: str, server: str, pid: str | None, status: str, error: str | None,
                videos: list[str] | None = None) -> None:
        job: StudyJob = self.jobs[job_id]
        now = self.wall()
        record = {
            "job_id": job_id, "setting_id": job.setting.id, "subject_id": job.subject.id,
            "face": str(job.subject.face), "prompt_id": job.prompt.id, "prompt": job.prompt.text,
            "seed": job.seed, "repeat": job.repeat, "status": status, "error": error, "server": server,
            "prompt_id_comfy": pid,
            "started": studydir.utc_iso(self.started_at.get(job_id, self.queued_at.get(job_id, now))),
            "finished": studydir.utc_iso(now), "videos": videos or [],
            "workflow_sha256": self.sent_sha.get(job_id),
        }
        studydir.write_record(self.folder, record)
        self.ended[job_id] = status
        self.downloaded.pop(job_id, None)
        self._progress(job_id, server, status, error)

    def _progress(self, job_id: str, server: str, status: str, error: str | None) -> None:
        total = len(self.jobs)
        done = self.skipped + sum(s == "done" for s in self.ended.values())
        failed = self.failed_before + sum(s == "failed" for s in self.ended.values())
        left = total - done - failed
        busy = []
        for s in self.sched.servers.values():
            state = f"{len(s.in_flight)} busy" if s.state in (UP, SUSPECT) else s.state
            busy.append(f"{short_name(s.name)} {state}, {s.done} done")
        elapsed = self.clock() - self.t0
        ended_now = len(self.ended)
        eta = f", ETA {_fmt_eta(elapsed / ended_now * left)}" if ended_now and left and elapsed > 0 else ""
        what = "done  " if status == "done" else f"FAILED ({error})"
        self._line(f"[{done + failed}/{total}] {what} {job_id} on {short_name(server)} | " + "; ".join(busy)
                   + f" | {done} done, {failed} failed, {left} left{eta}")

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def run_study(study: Study, folder: Path, clients: list[Client], opts: RunOptions | None = None,
              stream: TextIO | None = None, **kw: Any) -> RunOutcome:
    import sys

    return StudyRunner(study, folder, clients, opts or RunOptions(), stream or sys.stderr, **kw).run()
