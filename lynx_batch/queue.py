"""Batch-queue a Lynx API workflow on a running ComfyUI server: ``python -m lynx_batch queue``.

    python -m lynx_batch queue --server http://127.0.0.1:8188 \\
        --workflow workflows/api/lynx_full_t2v_api.json \\
        --faces photos/ --prompts prompts.csv --out results/

One job per (prompt, face photo) pair: every prompt runs with every photo, unless a CSV row names
its own photo in a ``face`` column. Photos go up through ``/upload/image``, jobs are queued through
``/prompt``, progress comes from the ``/ws`` websocket (or from polling ``/history`` when the
optional ``websocket-client`` package is missing), and the saved files are fetched through
``/view``. A failing job is reported with the server's error message and never stops the batch;
a workflow the server cannot run at all (a missing model) stops it at the first job. Whatever
happens (failures, Ctrl-C, the server going away) every job ends in the summary and the report
with what really became of it.
"""
import argparse
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from .client import UPLOAD_SUBFOLDER, ComfyClient, EventSource, open_events
from .errors import JobError, PromptRejected, QueueError, ServerGone, WorkflowRejected
from .files import write_new_file
from .inputs import IMAGE_SUFFIXES, Job, find_faces, load_prompts, make_jobs
from .progress import NullStream, Progress
from .report import FINAL_STATES, REPORT_NAME, JobResult, format_summary, write_report
from .server_errors import (format_execution_error, format_prompt_error, history_error, interrupted_text,
                            is_workflow_error, output_files, was_interrupted)
from .workflow import Targets, apply_job, load_workflow, locate_targets

__all__ = [
    "BatchOptions", "BatchOutcome", "ComfyClient", "EventSource", "FINAL_STATES", "IMAGE_SUFFIXES", "Job",
    "JobError", "JobResult",
    "QueueError", "ServerGone", "Targets", "UPLOAD_SUBFOLDER", "WorkflowRejected", "add_arguments", "apply_job",
    "build_parser", "find_faces", "format_execution_error", "format_prompt_error", "format_summary",
    "history_error", "load_prompts", "load_workflow", "locate_targets", "main", "make_jobs", "output_files",
    "SUMMARY", "run", "run_batch", "write_report",
]

log = logging.getLogger("lynx.queue")

SUMMARY = "Queue a Lynx API workflow on a ComfyUI server for many face photos and prompts."

LOST_AFTER_S = 30.0  # a job off the queue whose /history entry never shows up
REINTERRUPT_S = 2.0  # ComfyUI drops an interrupt that lands just before a prompt starts: resend
EXIT_OK, EXIT_FAILED, EXIT_NOT_STARTED, EXIT_CTRL_C = 0, 1, 2, 130


@dataclass
class BatchOptions:
    out_dir: Path
    include_temp: bool = False
    timeout: float = 0.0  # seconds per running job; 0 = no limit
    poll_interval: float = 1.0
    use_websocket: bool = True
    face_node: str | None = None
    prompt_node: str | None = None
    negative_node: str | None = None
    on_ctrl_c: str = "interrupt"  # interrupt | wait
    server_grace: float = 30.0  # seconds the server may not answer before the batch gives up
    cancel_wait: float = 120.0  # seconds to wait for the server to confirm a Ctrl-C interrupt


@dataclass
class BatchOutcome:
    results: list[JobResult]
    stopped: str | None = None  # why the batch ended before every job ran (one paragraph), else None
    cancelled: bool = False  # Ctrl-C
    workflow_rejected: bool = False  # the server refuses the workflow itself; nothing more was sent

    @property
    def exit_code(self) -> int:
        if self.cancelled:
            return EXIT_CTRL_C
        if self.workflow_rejected and not any(r.prompt_id for r in self.results):
            return EXIT_NOT_STARTED
        return EXIT_OK if all(r.status == "ok" for r in self.results) else EXIT_FAILED


def run_batch(client: ComfyClient, workflow: dict[str, Any], jobs: list[Job], opts: BatchOptions,
              stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic) -> BatchOutcome:
    """Upload, queue and follow every job. Never raises for a job's failure, Ctrl-C or a server that
    goes away: every job of the outcome ends in one of FINAL_STATES."""
    targets = locate_targets(workflow, opts.face_node, opts.prompt_node, opts.negative_node,
                             need_face=any(j.face for j in jobs))
    if targets.face_node is None and any(j.face for j in jobs):
        raise QueueError("photos were given but the workflow has no face LoadImage node (--face-node ID)")
    if targets.face_node is not None and not any(j.face for j in jobs):
        log.warning("no --faces given: node %s keeps its image %r", targets.face_node,
                    workflow[targets.face_node]["inputs"].get("image"))
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    return _Batch(client, workflow, targets, jobs, opts, stream, clock).run()


class _Batch:
    """The state of one batch while it runs."""

    def __init__(self, client: ComfyClient, workflow: dict[str, Any], targets: Targets, jobs: list[Job],
                 opts: BatchOptions, stream: TextIO, clock: Callable[[], float]) -> None:
        self.client, self.workflow, self.targets, self.opts, self.clock = client, workflow, targets, opts, clock
        self.client_id = uuid.uuid4().hex
        self.progress = Progress(stream, len(jobs))
        self.results = [JobResult(job) for job in jobs]
        self.by_prompt: dict[str, JobResult] = {}
        self.uploaded: dict[Path, str] = {}
        self.events: EventSource | None = None
        self.errors: dict[str, str] = {}  # prompt id -> error seen on the websocket
        self.ended: set[str] = set()  # the server said the job ended; its /history entry may lag a little
        self.missing: dict[str, float] = {}
        self.interrupt_at: dict[str, float] = {}
        self.unreachable_since: float | None = None
        self.ctrl_c = 0  # Ctrl-C presses so far
        self.ctrl_c_applied = 0
        self.deadline: float | None = None  # when to stop waiting for the server after Ctrl-C
        self.gave_up: str | None = None  # why the tool stopped following jobs the server still has
        self.stopped: str | None = None
        self.server_lost = False
        self.workflow_rejected = False

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> BatchOutcome:
        try:
            self.events = open_events(self.client, self.client_id, self.opts.use_websocket)
        except KeyboardInterrupt:
            self.ctrl_c += 1
        try:
            while True:
                try:
                    if self.ctrl_c > self.ctrl_c_applied:
                        self._apply_ctrl_c()
                    if self.gave_up:
                        break
                    if self.ctrl_c == 0:
                        self._submit_all()
                    self._follow()
                    break
                except KeyboardInterrupt:
                    self.ctrl_c += 1  # handled at the top of the loop, where a further Ctrl-C is caught too
                except ServerGone as e:
                    self._server_gone(e)
                    break
        finally:
            if self.events is not None:
                self.events.close()
        self._settle_the_rest()
        if self.ctrl_c and not self.stopped:
            self.stopped = "stopped by Ctrl-C" + (f"; {self.gave_up}" if self.gave_up else "")
        return BatchOutcome(self.results, self.stopped, cancelled=self.ctrl_c > 0,
                            workflow_rejected=self.workflow_rejected)

    def _submit_all(self) -> None:
        # Queue everything first so the server never idles between jobs.
        total = len(self.results)
        for r in self.results:
            if r.status != "pending":
                continue
            try:
                face_value = None
                if r.job.face is not None:
                    key = r.job.face.resolve()
                    if key not in self.uploaded:
                        self.uploaded[key] = self.client.upload_image(r.job.face)
                    face_value = self.uploaded[key]
                wf = apply_job(self.workflow, self.targets, r.job, face_value)
                r.prompt_id = self.client.queue_prompt(wf, self.client_id)
                r.status = "queued"
                self.by_prompt[r.prompt_id] = r
                self.progress.line(f"[{r.job.index}/{total}] queued {r.prompt_id} ({_describe(r.job)})")
            except PromptRejected as e:
                if is_workflow_error(e.data, self.targets.job_inputs()):
                    self._reject_workflow(r, e)
                    return
                self._fail(r, str(e))
            except JobError as e:
                self._fail(r, str(e))

    def _reject_workflow(self, r: JobResult, e: PromptRejected) -> None:
        """Every job would get this error: say it once and send nothing more."""
        detail = format_prompt_error(e.data, self.workflow)
        r.status, r.error, r.finished = "failed", f"the server rejected the workflow: {detail}", self.clock()
        rest = [x for x in self.results if x.status == "pending"]
        for x in rest:
            x.status, x.error = "not_run", f"not sent: the server rejects the workflow itself (see job {r.job.index})"
        self.workflow_rejected = True
        self.stopped = (f"the server cannot run this workflow, whatever the photo, prompt or seed: {detail}. "
                        "Install what is missing on the server (model files go in its models/ folders) or "
                        f"fix the workflow, then run again; {len(rest)} more job(s) were not sent.")

    # -- following the jobs ---------------------------------------------------------------------
    def _open(self) -> list[str]:
        return sorted(pid for pid, r in self.by_prompt.items() if r.status in ("queued", "running"))

    def _follow(self) -> None:
        opts = self.opts
        last_poll = self.clock()
        # Short waits when a timeout has to be noticed in time.
        wait = max(0.05, min(1.0, opts.timeout / 4)) if opts.timeout else 1.0
        while self._open():
            if self.deadline is not None and self.clock() > self.deadline:
                self.gave_up = (f"the server did not confirm within {opts.cancel_wait:g} s; "
                                "it may still be running the job")
                return
            try:
                self._receive(wait)
                now = self.clock()
                # With a websocket, polling is only a safety net for missed messages; after Ctrl-C
                # the tool polls so that it sees at once what the server did.
                poll_every = opts.poll_interval if self.events is None or self.ctrl_c else max(10.0, opts.poll_interval)
                if self.events is None or self.ended or self.ctrl_c or now - last_poll >= poll_every:
                    last_poll = now
                    self.ended.clear()
                    self._poll(now)
                self._check_timeouts(self.clock())
                self.unreachable_since = None
            except ServerGone as e:
                now = self.clock()
                if self.unreachable_since is None:
                    self.unreachable_since = now
                    log.warning("%s; retrying for %g s", e, opts.server_grace)
                if now - self.unreachable_since >= opts.server_grace:
                    raise
                time.sleep(min(1.0, max(0.05, opts.poll_interval)))

    def _receive(self, wait: float) -> None:
        if self.events is None:
            time.sleep(self.opts.poll_interval)
            return
        try:
            msg = self.events.recv(timeout=wait)
        except Exception as e:  # the socket died: carry on by polling
            log.warning("websocket closed (%s): following the remaining jobs by polling /history", e)
            self.events.close()
            self.events = None
            return
        if msg is None:
            return
        data = msg.get("data") or {}
        pid = data.get("prompt_id")
        kind = msg.get("type")
        if pid not in self._open():
            return
        r = self.by_prompt[pid]
        if kind == "execution_start":
            self._started(r, self.clock())
        elif kind == "executing" and data.get("node") is None:
            self._finish(pid, self.client.history(pid))
        elif kind == "progress":
            self._started(r, self.clock())
            self.progress.step(r, self._node_name(data.get("node")), int(data.get("value", 0)),
                               int(data.get("max", 0)))
        elif kind == "execution_error":
            self.errors[pid] = format_execution_error(data)
        elif kind == "execution_interrupted":
            self.errors[pid] = interrupted_text({**data, "node_type": self._node_type(data.get("node_id"))})

    def _poll(self, now: float) -> None:
        running, waiting = self.client.queue_state()
        for pid in self._open():
            r = self.by_prompt[pid]
            if pid in running:
                self._started(r, now)
                if r.cancel == "remove":  # it started before the removal landed
                    r.cancel = "interrupt" if self._interrupt_wanted() else None
                if r.cancel == "interrupt" and now - self.interrupt_at.get(pid, -1e9) >= REINTERRUPT_S:
                    self.interrupt_at[pid] = now
                    self.client.interrupt(pid)
            elif pid in waiting:
                if r.cancel == "remove":
                    self.client.delete_queued([pid])
            else:  # off the queue: its /history entry is written, unless it was removed
                self._finish(pid, self.client.history(pid))

    def _check_timeouts(self, now: float) -> None:
        if not self.opts.timeout:
            return
        for pid in self._open():
            r = self.by_prompt[pid]
            if r.started is not None and not r.interrupt_sent and now - r.started > self.opts.timeout:
                r.interrupt_sent = True
                self.progress.line(f"[{r.job.index}/{self.progress.total}] over {self.opts.timeout:g} s: interrupting")
                self.client.interrupt(pid)

    def _started(self, r: JobResult, when: float) -> None:
        if r.started is None:
            r.status, r.started = "running", when
            self.progress.line(f"[{r.job.index}/{self.progress.total}] running {r.prompt_id}")

    def _finish(self, pid: str, entry: dict[str, Any] | None) -> None:
        r = self.by_prompt[pid]
        if entry is None:
            if r.cancel == "remove":
                r.status, r.finished = "removed", self.clock()
                r.error = "removed from the server queue (Ctrl-C); it never ran"
                self.progress.line(f"[{r.job.index}/{self.progress.total}] removed from the server queue")
                return
            first = self.missing.setdefault(pid, self.clock())
            if self.clock() - first > LOST_AFTER_S:
                self._fail(r, "the job left the server queue without a /history entry (was the server restarted?)")
            else:
                self.ended.add(pid)
            return
        r.finished = self.clock()
        if r.started is None:
            r.started = r.finished
        error = self.errors.get(pid) or history_error(entry)
        interrupted = was_interrupted(entry) or (error or "").startswith("interrupted at")
        try:
            r.outputs = self._download(entry, r.job)
        except ServerGone:
            raise  # not this job's fault: the batch waits for the server (--server-grace)
        except (JobError, QueueError, OSError) as e:
            error = error or str(e)
        if interrupted and r.cancel == "interrupt":
            r.status, r.error = "interrupted", f"interrupted on the server by Ctrl-C ({error})"
            self.progress.line(f"[{r.job.index}/{self.progress.total}] interrupted on the server")
            return
        if error and r.interrupt_sent:
            error = f"timed out after {self.opts.timeout:g} s ({error})"
        if error:
            self._fail(r, error)
            return
        r.status = "ok"
        files = ", ".join(p.name for p in r.outputs) or "no output files"
        late = " (it finished before the interrupt reached it)" if r.cancel else ""
        self.progress.line(f"[{r.job.index}/{self.progress.total}] done in {r.seconds:.1f} s{late}: {files}")

    def _download(self, entry: dict[str, Any], job: Job) -> list[Path]:
        saved = []
        for info in output_files(entry, self.opts.include_temp):
            data = self.client.view(info)
            saved.append(write_new_file(self.opts.out_dir, f"{job.label}_{Path(info['filename']).name}", data))
        return saved

    # -- Ctrl-C and a server that goes away -----------------------------------------------------
    def _interrupt_wanted(self) -> bool:
        # "interrupt": the first Ctrl-C stops the running job; "wait": the second one does.
        return self.ctrl_c >= (1 if self.opts.on_ctrl_c == "interrupt" else 2)

    def _apply_ctrl_c(self) -> None:
        """Take our waiting jobs off the server queue and, when wanted, interrupt the running one.
        Idempotent, so a Ctrl-C that lands in here is simply applied again."""
        if self.ctrl_c >= (2 if self.opts.on_ctrl_c == "interrupt" else 3):
            self.gave_up = "Ctrl-C again: stopped waiting for the server"
            self.ctrl_c_applied = self.ctrl_c
            return
        if self.events is not None:
            # Ctrl-C may have landed in the middle of a websocket frame; from here on the tool polls.
            self.events.close()
            self.events = None
        for r in self.results:
            if r.status == "pending":
                r.status, r.error = "not_run", "not sent: stopped by Ctrl-C"
        running, waiting = self.client.queue_state()
        # Waiting, or gone from the queue without ever being seen running: nothing left to interrupt.
        remove = [pid for pid in self._open()
                  if pid in waiting or (pid not in running and self.by_prompt[pid].started is None)]
        for pid in remove:
            self.by_prompt[pid].cancel = "remove"
        self.client.delete_queued([pid for pid in remove if pid in waiting])
        now = self.clock()
        running_ours = [pid for pid in self._open() if pid in running]
        if self._interrupt_wanted():
            for pid in running_ours:
                self.by_prompt[pid].cancel = "interrupt"
                self.interrupt_at[pid] = now
                self.client.interrupt(pid)
            self.deadline = now + self.opts.cancel_wait
        jobs = ", ".join(str(self.by_prompt[pid].job.index) for pid in running_ours) or "none"
        if self._interrupt_wanted():
            what = f"interrupting running job {jobs} on the server"
            then = "waiting for the server to confirm (Ctrl-C again to stop waiting)"
        else:
            what = f"letting running job {jobs} finish; its files will be downloaded"
            then = "Ctrl-C again interrupts it"
        self.progress.line(f"Ctrl-C: {what}, removing {len(remove)} waiting job(s) from the server queue; {then}")
        self.ctrl_c_applied = self.ctrl_c

    def _server_gone(self, e: ServerGone) -> None:
        self.server_lost = True
        done = sum(r.status == "ok" for r in self.results)
        self.stopped = (f"the ComfyUI server at {self.client.base} stopped answering ({e.reason}); "
                        f"{done} job(s) had finished and are downloaded, the others are reported as they stood "
                        "(restart the server and queue the jobs that are not ok again)")

    def _settle_the_rest(self) -> None:
        """Every job the loop left unfinished gets a final state that says what is known."""
        for r in self.results:
            if r.done:
                continue
            if r.status == "pending":
                r.status, r.error = "not_run", "not sent: the batch stopped before"
                continue
            ran = r.started is not None
            if self.server_lost:
                r.error = ("the server stopped answering while this job ran; its result is unknown "
                           "(look in the server's output folder)" if ran else
                           "was waiting in the server queue when the server stopped answering; "
                           "it runs if that server comes back with its queue")
            elif r.cancel == "interrupt":
                r.error = "Ctrl-C: the interrupt was sent but the server did not confirm it; the job may still run"
            elif r.cancel == "remove":
                r.error = "Ctrl-C: removal from the server queue was asked but not confirmed; the job may still run"
            else:
                r.error = "Ctrl-C: stopped waiting; the server goes on with this job (its files stay on the server)"
            r.status = "unknown"

    # -- small helpers --------------------------------------------------------------------------
    def _node_type(self, node_id: Any) -> str:
        return self.workflow.get(str(node_id), {}).get("class_type", "?")

    def _node_name(self, node_id: Any) -> str:
        ctype = self.workflow.get(str(node_id), {}).get("class_type")
        return f"{ctype} #{node_id}" if ctype else f"node {node_id}"

    def _fail(self, r: JobResult, message: str) -> None:
        r.status = "failed"
        r.error = message
        r.finished = self.clock()
        self.progress.line(f"[{r.job.index}/{self.progress.total}] FAILED: {message}")


def _describe(job: Job) -> str:
    face = job.face.name if job.face else "-"
    text = job.prompt if len(job.prompt) <= 50 else job.prompt[:47] + "..."
    return f"face {face}, seed {job.seed if job.seed is not None else 'as in workflow'}, {text!r}"


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    p.add_argument("--workflow", required=True, type=Path, help="API-format workflow JSON (workflows/api/...)")
    p.add_argument("--faces", type=Path, help="a face photo, or a folder of photos (each prompt runs with each photo)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="a .txt file (one prompt per line) or a .csv "
                     "(columns prompt[,negative,seed,face]); UTF-8, or UTF-16 with a BOM ('Unicode' on Windows)")
    src.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    p.add_argument("--negative", help="negative prompt for rows that have none (default: the workflow's)")
    p.add_argument("--seed", type=int, help="seed for rows that have none (default: the workflow's)")
    p.add_argument("--out", type=Path, default=Path("lynx_results"), help="folder for the downloaded files "
                   f"and the report (default %(default)s; made if missing). Nothing in it is ever overwritten: "
                   f"a file name that exists gets ' (1)', ' (2)'...; the report is {REPORT_NAME}, or "
                   "report_0001.json, report_0002.json... when earlier runs left one (the summary names it)")
    p.add_argument("--face-node", help="id of the LoadImage node that takes the photo")
    p.add_argument("--prompt-node", help="id of the positive CLIPTextEncode node")
    p.add_argument("--negative-node", help="id of the negative CLIPTextEncode node")
    p.add_argument("--timeout", type=float, default=0.0, help="interrupt a job that runs longer than this many "
                   "seconds (default: no limit)")
    p.add_argument("--on-ctrl-c", choices=("interrupt", "wait"), default="interrupt",
                   help="what Ctrl-C does to the job running on the server: 'interrupt' (default) stops it "
                   "there; 'wait' lets it finish and downloads it (Ctrl-C again interrupts it). Either way our "
                   "jobs still waiting in the server queue are removed from it and the report says what happened")
    p.add_argument("--server-grace", type=float, default=30.0, help="seconds the server may stop answering "
                   "before the batch gives up and reports what it has (default %(default)s)")
    p.add_argument("--include-temp", action="store_true", help="also download previews (temp files)")
    p.add_argument("--no-websocket", action="store_true", help="follow jobs by polling /history only")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between /history polls (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary")


def build_parser(prog: str = "python -m lynx_batch queue") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=SUMMARY,
        epilog="Exit codes: 0 every job ok; 1 some job did not finish ok (failed, not run, unknown); 2 the batch "
        "could not start (bad option or file, server unreachable, workflow rejected); 130 stopped by Ctrl-C.")
    add_arguments(p)
    return p


def prepare_out_dir(path: Path) -> None:
    """Make the --out folder now, before any job is sent, so a bad path never wastes a batch."""
    if path.exists() and not path.is_dir():
        raise QueueError(f"--out: {path} is a file, not a folder; give a folder for the results "
                         "(it is made if missing), e.g. --out results/")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QueueError(f"--out: cannot make the folder {path} ({e.strerror or e}); give a folder you can "
                         "write to") from None


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    """The ``queue`` subcommand on parsed arguments; returns the exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=stderr)
    try:
        workflow = load_workflow(args.workflow)
        if args.prompts is not None:
            prompts = load_prompts(args.prompts)
        else:
            prompts = [{"prompt": t} for t in args.prompt if t.strip()]
            if not prompts:
                raise QueueError("--prompt: give a non-empty prompt")
        if args.negative is not None:
            for row in prompts:
                row.setdefault("negative", args.negative)
        faces = find_faces(args.faces)
        jobs = make_jobs(prompts, faces, args.prompts, args.faces, args.seed)
        prepare_out_dir(args.out)
        client = ComfyClient(args.server)
        client.check()
        opts = BatchOptions(out_dir=args.out, include_temp=args.include_temp, timeout=args.timeout,
                            poll_interval=args.poll_interval, use_websocket=not args.no_websocket,
                            face_node=args.face_node, prompt_node=args.prompt_node,
                            negative_node=args.negative_node, on_ctrl_c=args.on_ctrl_c,
                            server_grace=args.server_grace)
        progress_stream = NullStream() if args.quiet else stderr
        outcome = run_batch(client, workflow, jobs, opts, stream=progress_stream)
    except QueueError as e:
        stderr.write(f"error: {e}\n")
        return EXIT_NOT_STARTED
    stdout.write(format_summary(outcome.results) + "\n")
    try:
        report = write_report(outcome.results, args.out)
    except OSError as e:
        stderr.write(f"error: could not write the report into {args.out} ({e.strerror or e})\n")
        return EXIT_NOT_STARTED
    stdout.write(f"report: {report}\n")
    if outcome.stopped:
        stderr.write(f"error: {outcome.stopped}\n" if not outcome.cancelled else f"{outcome.stopped}\n")
    return outcome.exit_code


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """``python -m lynx_batch queue ...`` without the subcommand word (what tests and scripts call)."""
    args = build_parser().parse_args(argv)
    return run(args, stdout or sys.stdout, stderr or sys.stderr)

