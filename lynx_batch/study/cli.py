"""``python -m lynx_batch study run|plan|score|report|compare``: identity studies over many ComfyUI servers.

    python -m lynx_batch study plan study.toml
    python -m lynx_batch study run study.toml --out studies/ip_scale \\
        --server http://gpu1:8188 --server http://gpu2:8188
    python -m lynx_batch study compare studies/a studies/b --out studies/a_vs_b
"""
import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from ..client import ComfyClient
from ..errors import QueueError
from ..progress import NullStream
from .grid import make_jobs
from .runner import EXIT_CTRL_C, EXIT_FAILED, EXIT_NOT_STARTED, EXIT_OK, RunOptions, StudyRunner, short_name
from .studyfile import Study, load_study

SUMMARY = "Run an identity study (faces x prompts x a grid of settings) over many ComfyUI servers, score and report it."
EPILOG = ("Exit codes of 'run': 0 every job done; 1 some job failed (or scoring failed); 2 the study could not "
          "start (bad study file, --out holds another study, no server answers); 3 every server went away "
          "(run the same command again to resume); 130 stopped by Ctrl-C (run it again to resume).")
SERVER_TIMEOUT_S = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study_command", required=True, metavar="ACTION")

    run = sub.add_parser("run", help="run the study's jobs (a rerun resumes), then score and report it",
                         description="Run every job of the study over the servers; a rerun with the same "
                         "--out skips the jobs already done.", epilog=EPILOG)
    run.add_argument("study_file", type=Path, metavar="STUDY_FILE", help="the study (.toml or .json)")
    run.add_argument("--out", type=Path, required=True, help="the study folder (made if missing; a rerun resumes "
                     "the study in it)")
    run.add_argument("--server", action="append", required=True, metavar="URL",
                     help="a ComfyUI server (repeat for more: one per GPU or machine)")
    run.add_argument("--per-server", type=int, default=2, metavar="N", help="prompts queued at once on each "
                     "server (default 2: one running and one waiting, so the GPU never idles)")
    run.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                     help="run the jobs that failed in an earlier run again (default: yes)")
    run.add_argument("--force-new", action="store_true", help="--out holds another study: move its files "
                     "into <out>/superseded-<time>/ and start this study there")
    run.add_argument("--no-score", action="store_true", help="do not score and report at the end")
    run.add_argument("--server-grace", type=float, default=30.0, metavar="S", help="seconds a server may not "
                     "answer before its jobs go to the others (default %(default)s)")
    run.add_argument("--poll-interval", type=float, default=1.0, metavar="S",
                     help="seconds between looks at the servers (default %(default)s)")
    run.add_argument("--cancel-wait", type=float, default=30.0, metavar="S", help="after Ctrl-C, seconds to wait "
                     "for the servers to confirm (default %(default)s)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    run.set_defaults(_study=_cmd_run)

    plan = sub.add_parser("plan", help="check the study file and print its grid and job count (runs nothing)")
    plan.add_argument("study_file", type=Path, metavar="STUDY_FILE")
    plan.add_argument("--jobs", action="store_true", help="also list every job id")
    plan.set_defaults(_study=_cmd_plan)

    score = sub.add_parser("score", help="score the done jobs of a study folder")
    score.add_argument("study_dir", type=Path, metavar="DIR")
    score.set_defaults(_study=_cmd_score)

    report = sub.add_parser("report", help="write the study's report (CSV, JSON, HTML) from its scores")
    report.add_argument("study_dir", type=Path, metavar="DIR")
    report.set_defaults(_study=_cmd_report)

    compare = sub.add_parser("compare", help="compare two studies side by side")
    compare.add_argument("dir_a", type=Path, metavar="DIR_A")
    compare.add_argument("dir_b", type=Path, metavar="DIR_B")
    compare.add_argument("--out", type=Path, required=True, help="folder for the comparison")
    compare.set_defaults(_study=_cmd_compare)


def build_parser(prog: str = "python -m lynx_batch study") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY, epilog=EPILOG)
    add_arguments(p)
    return p


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=stderr)
    try:
        return args._study(args, stdout, stderr)
    except (QueueError, ValueError) as e:  # scoring's own errors (a bad study folder) are ValueErrors
        stderr.write(f"error: {e}\n")
        return EXIT_NOT_STARTED
    except KeyboardInterrupt:
        stderr.write("stopped by Ctrl-C\n")
        return EXIT_CTRL_C


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args, stdout or sys.stdout, stderr or sys.stderr)


# -- actions --------------------------------------------------------------------------------------
def describe(study: Study) -> str:
    t = study.targets
    lines = [f"study '{study.name}' ({study.study_file})",
             f"workflow: {study.workflow_path}",
             f"  face photo -> node {t.face_node}.image, prompt -> node {t.prompt_node}.text"
             + (f", negative -> node {t.negative_node}.text" if t.negative_node else "")
             + f", seed -> {', '.join(f'{n}.{i}' for n, i in t.seed_inputs) or 'none'}",
             f"subjects: {len(study.subjects)} ({', '.join(s.id for s in study.subjects)})",
             f"prompts: {len(study.prompts)}", f"seeds: {', '.join(map(str, study.seeds))}",
             f"repeats: {study.repeats}", f"settings: {len(study.settings)}"]
    for s in study.settings:
        values = ", ".join(f"{k}={v!r}" for k, v in s.values.items()) or "the workflow as is"
        lines.append(f"  {s.id}  {s.label}  [{values}]")
    lines.append(f"jobs: {len(study.settings)} settings x {len(study.subjects)} subjects x {len(study.prompts)} "
                 f"prompts x {len(study.seeds)} seeds x {study.repeats} repeats = {study.job_count}")
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    study = load_study(args.study_file)
    stdout.write(describe(study) + "\n")
    if args.jobs:
        for job in make_jobs(study):
            stdout.write(job.job_id + "\n")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    if args.per_server < 1:
        raise QueueError("--per-server must be 1 or more")
    study = load_study(args.study_file)
    clients = [ComfyClient(url, timeout=SERVER_TIMEOUT_S) for url in args.server]
    opts = RunOptions(per_server=args.per_server, poll_interval=args.poll_interval, server_grace=args.server_grace,
                      retry_failed=args.retry_failed, cancel_wait=args.cancel_wait, force_new=args.force_new)
    stream = NullStream() if args.quiet else stderr
    runner = StudyRunner(study, args.out, clients, opts, stream)
    outcome = runner.run()
    servers = ", ".join(f"{short_name(s.name)} {s.done} done" + (f" ({s.state}: {s.why})" if s.why else "")
                        for s in runner.sched.servers.values()) if runner.sched else ""
    stdout.write(f"{outcome.total} jobs: {outcome.done} done ({outcome.skipped} in earlier runs), "
                 f"{outcome.failed} failed, {outcome.left} left" + (f"; {servers}" if servers else "") + "\n")
    stdout.write(f"study folder: {args.out} (run record {outcome.run_record})\n")
    if outcome.failed:
        stdout.write(f"failed jobs: see {args.out / 'jobs'} (status \"failed\", error); a rerun retries them\n")
    if outcome.stopped:
        stderr.write(("" if outcome.cancelled else "error: ") + outcome.stopped + "\n")
        return outcome.exit_code
    code = outcome.exit_code
    if not args.no_score and outcome.done:
        if _score_and_report(args.out, stdout, stderr) != EXIT_OK:
            code = EXIT_FAILED
    return code


def _score_and_report(folder: Path, stdout: TextIO, stderr: TextIO) -> int:
    for step, module, name in (("scoring", "scoring", "score_study"), ("the report", "report", "write_report")):
        try:
            fn = _h7(module, name)
            result = fn(folder, log=_logger(stderr)) if module == "scoring" else fn(folder)
        except Exception as e:  # noqa: BLE001  (every video is safe on disk: say how to finish later)
            stderr.write(f"error: {step} failed: {e}; the videos are all there: fix it, then run "
                         f"'python -m lynx_batch study score {folder}' and 'python -m lynx_batch study report "
                         f"{folder}'\n")
            return EXIT_FAILED
        if module == "report":
            _print_paths(result, stdout)
    return EXIT_OK


def _cmd_score(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    _need_study_dir(args.study_dir)
    _h7("scoring", "score_study")(args.study_dir, log=_logger(stderr))
    return EXIT_OK


def _cmd_report(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    _need_study_dir(args.study_dir)
    _print_paths(_h7("report", "write_report")(args.study_dir), stdout)
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    _need_study_dir(args.dir_a)
    _need_study_dir(args.dir_b)
    _print_paths(_h7("compare", "write_comparison")(args.dir_a, args.dir_b, args.out), stdout)
    return EXIT_OK


# -- helpers --------------------------------------------------------------------------------------
def _need_study_dir(folder: Path) -> None:
    if not (folder / "study.json").is_file():
        raise QueueError(f"{folder} is not a study folder (no study.json); give the --out folder of "
                         "'python -m lynx_batch study run'")


def _h7(module: str, name: str) -> Callable[..., Any]:
    """Scoring and reports import heavy packages (torch, the face models): only when asked for."""
    try:
        mod = importlib.import_module(f"lynx_batch.study.{module}")
    except ImportError as e:
        raise QueueError(f"the study {module} module cannot be loaded ({e}); scoring needs the node pack's "
                         "requirements (pip install -r requirements.txt)") from None
    return getattr(mod, name)


def _logger(stream: TextIO) -> Callable[[str], None]:
    def log(message: str) -> None:
        stream.write(str(message) + "\n")
        stream.flush()
    return log


def _print_paths(result: Any, stdout: TextIO) -> None:
    if isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, (str, Path)):
                stdout.write(f"{key}: {value}\n")
