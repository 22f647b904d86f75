"""The study scheduler and runner against in-process fake ComfyUI servers on a fake clock.

Each fake keeps ComfyUI's bookkeeping: one prompt runs at a time for ``job_s`` fake seconds, the
rest wait in order; /queue items carry the client_id of their /prompt; a finished prompt moves
to /history with its outputs (or its execution_error / execution_interrupted status message);
/interrupt only stops the prompt it names; POST /queue delete only takes waiting prompts. A dead
fake raises ServerGone on every call (connection refused); a restarted one answers again with an
empty queue and history, as a restarted ComfyUI does. The runner's sleep advances the clock, so a
study of minutes runs in milliseconds.
"""
import json
from pathlib import Path

import pytest

from lynx_batch.errors import PromptRejected, ServerGone
from lynx_batch.study.grid import make_jobs
from lynx_batch.study.runner import RunOptions, StudyRunner
from lynx_batch.study.scheduler import DOWN, UP, Scheduler
from lynx_batch.study.studyfile import StudyError, load_study

ROOT = Path(__file__).resolve().parents[1]
LITE_API = ROOT / "workflows" / "api" / "lynx_lite_t2v_api.json"
RECORD_KEYS = {"job_id", "setting_id", "subject_id", "face", "prompt_id", "prompt", "seed", "repeat", "status",
               "error", "server", "prompt_id_comfy", "started", "finished", "videos", "workflow_sha256"}


class World:
    """The fake clock, the servers, and things that happen at given times."""

    def __init__(self) -> None:
        self.now = 0.0
        self.servers: list["FakeServer"] = []
        self.events: list[tuple[float, object]] = []
        self.ctrl_c_at: float | None = None

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for s in self.servers:
            s.tick()
        due = [e for e in self.events if e[0] <= self.now]
        self.events = [e for e in self.events if e[0] > self.now]
        for _, action in due:
            action()
        if self.ctrl_c_at is not None and self.now >= self.ctrl_c_at:
            self.ctrl_c_at = None
            raise KeyboardInterrupt

    def at(self, t: float, action) -> None:
        self.events.append((t, action))


class FakeServer:
    def __init__(self, world: World, name: str, job_s: float = 3.0) -> None:
        self.world, self.base, self.job_s = world, name, job_s
        world.servers.append(self)
        self.alive = True
        self.waiting: list[tuple[str, str, dict, float]] = []  # (prompt id, client id, workflow, queued at)
        self.free_at = 0.0  # when the running prompt started, or the server was free
        self.running: tuple[str, str, dict, float] | None = None
        self.history_: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        self.counter = 0
        self.accepted: list[str] = []  # every prompt id /prompt accepted, in order
        self.completed: list[str] = []  # prompt ids that ran to success
        self.most_at_once = 0
        self.deleted: list[str] = []
        self.interrupted: list[str] = []
        self.uploads = 0
        self.fail_if = lambda wf: None  # -> an exception message: the sampler raises it
        self.reject_all: dict | None = None  # a /prompt 400 body every prompt gets

    # -- what the test does to it ---------------------------------------------------------------
    def die(self) -> None:
        self.alive = False

    def restart(self) -> None:
        """ComfyUI restarted: it answers again, with nothing queued and no history."""
        self.alive, self.waiting, self.running, self.history_ = True, [], None, {}
        self.free_at = self.world.now

    # -- execution -----------------------------------------------------------------------------
    def tick(self) -> None:
        """Run the queue up to the world's time: each prompt takes job_s, one after the other."""
        if not self.alive:
            return
        while True:
            if self.running is None:
                if not self.waiting:
                    return
                pid, cid, wf, queued = self.waiting.pop(0)
                self.running = (pid, cid, wf, max(self.free_at, queued))
            pid, cid, wf, start = self.running
            end = start + self.job_s
            if end > self.world.now:
                return
            self.free_at, self.running = end, None
            error = self.fail_if(wf)
            if error:
                self.history_[pid] = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
                    ["execution_error", {"node_id": "11", "node_type": "LynxSampler",
                                         "exception_type": "RuntimeError", "exception_message": error}]]}}
                continue
            self.counter += 1
            name = f"lynx_lite_{self.counter:05d}.mp4"
            self.files[name] = f"{self.base} {pid} {json.dumps(wf, sort_keys=True)}".encode()
            self.history_[pid] = {"outputs": {"13": {"gifs": [{"filename": name, "subfolder": "Lynx",
                                                               "type": "output"}]}},
                                  "status": {"status_str": "success", "completed": True, "messages": []}}
            self.completed.append(pid)

    def _up(self) -> None:
        if not self.alive:
            raise ServerGone(f"cannot reach {self.base}", reason="[Errno 111] Connection refused")
        self.tick()

    # -- the client interface ---------------------------------------------------------------------
    def check(self) -> dict:
        self._up()
        return {"system": {}}

    def upload_image(self, path: Path) -> str:
        self._up()
        self.uploads += 1
        return f"lynx_queue/{path.name}"

    def queue_prompt(self, workflow: dict, client_id: str) -> str:
        self._up()
        if self.reject_all is not None:
            raise PromptRejected("the server rejected the workflow", self.reject_all)
        pid = f"{self.base.rsplit(':', 1)[-1]}-{len(self.accepted)}"
        self.accepted.append(pid)
        self.waiting.append((pid, client_id, workflow, self.world.now))
        self.tick()
        self.most_at_once = max(self.most_at_once, len(self.waiting) + (self.running is not None))
        return pid

    def queue_state(self, client_id: str | None = None) -> tuple[set[str], set[str]]:
        self._up()
        ours = lambda cid: client_id is None or cid == client_id  # noqa: E731
        running = {self.running[0]} if self.running and ours(self.running[1]) else set()
        return running, {w[0] for w in self.waiting if ours(w[1])}

    def history(self, prompt_id: str) -> dict | None:
        self._up()
        return self.history_.get(prompt_id)

    def view(self, info: dict) -> bytes:
        self._up()
        return self.files[info["filename"]]

    def interrupt(self, prompt_id: str) -> None:
        self._up()
        if self.running and self.running[0] == prompt_id:
            self.interrupted.append(prompt_id)
            self.history_[prompt_id] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                        "messages": [["execution_interrupted", {"node_id": "11",
                                                                                "node_type": "LynxSampler"}]]}}
            self.running, self.free_at = None, self.world.now

    def delete_queued(self, prompt_ids: list[str]) -> None:
        self._up()
        self.deleted += [w[0] for w in self.waiting if w[0] in prompt_ids]
        self.waiting = [w for w in self.waiting if w[0] not in prompt_ids]


# ------------------------------------------------------------------------------------------------
def make_study(tmp: Path, faces=("alice", "bob", "carol"), prompts=2, grid='"Lynx Sampler.ip_scale" = [0.8, 1.0]',
               seeds="[42]") -> Path:
    (tmp / "faces").mkdir(exist_ok=True)
    for f in faces:
        (tmp / "faces" / f"{f}.png").write_bytes(b"\x89PNG fake " + f.encode())
    prompt_lines = "\n".join(f"prompt number {i}" for i in range(prompts))
    (tmp / "prompts.txt").write_text(prompt_lines + "\n", encoding="utf-8")
    path = tmp / "study.toml"
    path.write_text(f'name = "t"\nworkflow = "{LITE_API}"\nfaces = "faces"\nprompts = "prompts.txt"\n'
                    f"seeds = {seeds}\n[grid]\n{grid}\n", encoding="utf-8")
    return path


def runner(world: World, study_path: Path, out: Path, servers, **opts) -> StudyRunner:
    options = RunOptions(**{"poll_interval": 1.0, "server_grace": 6.0, "lost_after": 2.0, "backoff_start": 5.0,
                            **opts})
    return StudyRunner(load_study(study_path), out, servers, options, stream=Log(), clock=world.clock,
                       sleep=world.sleep, wall=world.wall)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines += [t for t in text.splitlines() if t]
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "\n".join(self.lines)


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "jobs").glob("*.json")}


@pytest.fixture
def world() -> World:
    return World()


# ------------------------------------------------------------------------------------------------
def test_scheduler_spreads_jobs_and_respects_capacity():
    s = Scheduler([f"j{i}" for i in range(7)], ["a", "b"], capacity=2)
    first = s.next_assignments()
    assert [srv for srv, _ in first] == ["a", "b", "a", "b"]  # the freest server gets the next job
    assert s.next_assignments() == []  # both full
    s.finished("j1", ok=True)
    assert s.next_assignments() == [("b", "j4")]
    back = s.down("a", now=10.0, why="gone")
    assert back == ["j0", "j2"] and list(s.pending)[:2] == ["j0", "j2"]  # first in line again
    assert s.servers["a"].state == DOWN and s.due_for_retry(14.0) == [] and s.due_for_retry(15.0) == ["a"]
    assert s.next_assignments() == []  # b is full, a is down
    s.finished("j3", ok=True)
    assert s.next_assignments() == [("b", "j0")]  # only b takes jobs now, up to its capacity
    s.retry_failed("a", now=15.0, why="still gone")
    assert s.servers["a"].retry_at == 25.0  # the backoff doubled
    s.back_up("a")
    assert s.servers["a"].state == UP and [srv for srv, _ in s.next_assignments()] == ["a", "a"]


def test_scheduler_gives_up_on_a_job_that_keeps_losing_its_server():
    s = Scheduler(["j0"], ["a"], capacity=1, max_lost=2)
    s.next_assignments()
    assert s.lost("j0") is True and list(s.pending) == ["j0"]
    s.next_assignments()
    assert s.lost("j0") is False and not s.pending and s.given_up("j0")


def test_capacity_and_records_over_two_servers(world, tmp_path):
    a, b = FakeServer(world, "http://a:1"), FakeServer(world, "http://b:2", job_s=5.0)
    out = tmp_path / "study"
    r = runner(world, make_study(tmp_path), out, [a, b], per_server=2)
    outcome = r.run()
    assert (outcome.total, outcome.done, outcome.failed, outcome.left, outcome.exit_code) == (12, 12, 0, 0, 0)
    assert a.most_at_once == 2 and b.most_at_once == 2  # never more than --per-server on one server
    assert a.completed and b.completed and len(a.completed) > len(b.completed)  # the faster one did more
    assert len(a.accepted) + len(b.accepted) == 12  # nothing ran twice
    recs = records(out)
    assert sorted(recs) == sorted(j.job_id for j in make_jobs(load_study(tmp_path / "study.toml")))
    rec = recs["s01-bob-p01-seed42-r0"]
    assert set(rec) == RECORD_KEYS
    assert (rec["setting_id"], rec["subject_id"], rec["prompt_id"], rec["seed"], rec["repeat"]) == \
        ("s01", "bob", "p01", 42, 0)
    assert rec["status"] == "done" and rec["error"] is None and rec["prompt"] == "prompt number 1"
    assert rec["face"] == str((tmp_path / "faces" / "bob.png").resolve())
    (video,) = rec["videos"]
    assert video.startswith("videos/s01-bob-p01-seed42-r0/") and video.endswith(".mp4")
    served = (out / video).read_bytes().decode()
    server, pid, sent = served.split(" ", 2)
    assert server == rec["server"] and pid == rec["prompt_id_comfy"]
    sent = json.loads(sent)
    # the setting, the face, the prompt and the seed reached the server
    assert sent["11"]["inputs"]["ip_scale"] == 1.0 and sent["11"]["inputs"]["seed"] == 42
    assert sent["5"]["inputs"]["image"] == "lynx_queue/bob.png" and sent["7"]["inputs"]["text"] == "prompt number 1"
    assert a.uploads + b.uploads <= 6  # each photo once per server
    study = json.loads((out / "study.json").read_text())
    assert [s["id"] for s in study["settings"]] == ["s00", "s01"] and study["settings"][0]["values"] == \
        {"11.ip_scale": 0.8}
    run = json.loads((out / "runs" / "run.json").read_text())
    assert run["done"] == 12 and run["servers"]["http://a:1"]["done"] == len(a.completed)
    assert "ETA" in r.stream.text() and "[12/12]" in r.stream.text()


def test_a_server_dying_mid_study_leaves_everything_to_the_other(world, tmp_path):
    a, b = FakeServer(world, "http://a:1"), FakeServer(world, "http://b:2")
    world.at(4.0, b.die)
    out = tmp_path / "study"
    r = runner(world, make_study(tmp_path), out, [a, b])
    outcome = r.run()
    assert (outcome.done, outcome.failed, outcome.exit_code) == (12, 0, 0)
    recs = records(out)
    assert len(recs) == 12 and all(x["status"] == "done" for x in recs.values())
    on_b = {x["job_id"] for x in recs.values() if x["server"] == "http://b:2"}
    assert len(on_b) == len(b.completed) == 1  # the one it finished before dying
    assert len(a.completed) == 11
    lost = len(b.accepted) - len(b.completed)
    assert lost >= 1 and r.sched.servers["http://b:2"].state == DOWN and r.sched.servers["http://b:2"].lost == lost
    assert "http://b:2" not in {x["server"] for x in recs.values() if x["job_id"] not in on_b}
    assert "b:2 is down" in r.stream.text()


def test_a_restarted_server_loses_its_queue_its_jobs_are_requeued_and_it_is_used_again(world, tmp_path):
    a, b = FakeServer(world, "http://a:1"), FakeServer(world, "http://b:2")
    world.at(4.0, b.restart)
    out = tmp_path / "study"
    r = runner(world, make_study(tmp_path), out, [a, b])
    outcome = r.run()
    assert (outcome.done, outcome.exit_code) == (12, 0)
    recs = records(out)
    assert len(recs) == 12
    lost_on_b = [p for p in b.accepted[:4] if p not in b.completed]
    assert lost_on_b  # the restart really took prompts with it
    assert "restarted" in r.stream.text()
    assert r.sched.servers["http://b:2"].state == UP  # it came back and took jobs again
    after = [x for x in recs.values() if x["server"] == "http://b:2" and x["prompt_id_comfy"] not in b.accepted[:4]]
    assert after, "the restarted server got no more jobs"
    assert sum(1 for x in recs.values() if x["server"] == "http://a:1") == len(a.completed)


def test_all_servers_dead_stops_cleanly_and_a_rerun_resumes(world, tmp_path):
    a, b = FakeServer(world, "http://a:1"), FakeServer(world, "http://b:2")
    world.at(7.0, a.die)
    world.at(7.0, b.die)
    out = tmp_path / "study"
    study = make_study(tmp_path)
    first = runner(world, study, out, [a, b]).run()
    assert first.all_dead and first.exit_code == 3 and not first.cancelled
    assert "run the same command again to resume" in first.stopped
    assert 0 < first.done < 12 and first.left == 12 - first.done
    done_before = {k for k, v in records(out).items() if v["status"] == "done"}
    assert len(done_before) == first.done
    run1 = json.loads((out / "runs" / "run.json").read_text())
    assert run1["exit_code"] == 3 and run1["left"] == first.left
    mtimes = {k: (out / "jobs" / f"{k}.json").stat().st_mtime_ns for k in done_before}

    a.restart()
    b.restart()
    accepted = len(a.accepted) + len(b.accepted)
    second = runner(world, study, out, [a, b]).run()
    assert (second.done, second.skipped, second.exit_code) == (12, first.done, 0)
    assert len(a.accepted) + len(b.accepted) - accepted == 12 - first.done  # finished jobs did not run again
    assert {k: (out / "jobs" / f"{k}.json").stat().st_mtime_ns for k in done_before} == mtimes
    assert (out / "runs" / "run_0001.json").is_file()


def test_ctrl_c_cancels_on_every_server_and_a_rerun_redoes_only_the_rest(world, tmp_path):
    a, b = FakeServer(world, "http://a:1"), FakeServer(world, "http://b:2")
    world.ctrl_c_at = 7.5
    out = tmp_path / "study"
    study = make_study(tmp_path)
    first = runner(world, study, out, [a, b]).run()
    assert first.cancelled and first.exit_code == 130
    # our running prompts were interrupted and our waiting ones deleted, on both servers
    assert a.interrupted and b.interrupted and a.deleted and b.deleted
    assert not a.waiting and not b.waiting and a.running is None and b.running is None
    recs = records(out)
    assert recs and all(x["status"] == "done" for x in recs.values())  # interrupted jobs leave no record
    done_first = len(recs)
    assert first.done == done_first and first.left == 12 - done_first

    sent = len(a.accepted) + len(b.accepted)
    second = runner(world, study, out, [a, b]).run()
    assert second.exit_code == 0 and second.skipped == done_first and second.done == 12
    assert len(a.accepted) + len(b.accepted) - sent == 12 - done_first


def test_a_failing_job_is_recorded_and_the_study_goes_on_then_retried(world, tmp_path):
    a, b = FakeServer(world, "http://a:1"), FakeServer(world, "http://b:2")
    for s in (a, b):
        s.fail_if = lambda wf: "CUDA out of memory" if wf["7"]["inputs"]["text"] == "prompt number 1" \
            and wf["5"]["inputs"]["image"].endswith("carol.png") else None
    out = tmp_path / "study"
    study = make_study(tmp_path)
    first = runner(world, study, out, [a, b]).run()
    assert (first.done, first.failed, first.exit_code) == (10, 2, 1)
    bad = records(out)["s00-carol-p01-seed42-r0"]
    assert bad["status"] == "failed" and bad["videos"] == []
    assert "LynxSampler (node 11)" in bad["error"] and "CUDA out of memory" in bad["error"]

    kept = runner(world, study, out, [a, b], retry_failed=False).run()  # --no-retry-failed
    assert (kept.done, kept.failed, kept.skipped) == (10, 2, 10)
    for s in (a, b):
        s.fail_if = lambda wf: None
    retried = runner(world, study, out, [a, b]).run()
    assert (retried.done, retried.failed, retried.exit_code) == (12, 0, 0)
    assert records(out)["s00-carol-p01-seed42-r0"]["status"] == "done"
    # the failed record was replaced, but kept
    old = json.loads((out / "jobs" / "superseded" / "s00-carol-p01-seed42-r0.json").read_text())
    assert old["status"] == "failed" and "CUDA out of memory" in old["error"]


def test_results_are_never_overwritten(world, tmp_path):
    a = FakeServer(world, "http://a:1")
    out = tmp_path / "study"
    study = make_study(tmp_path, faces=("alice",), prompts=1)
    assert runner(world, study, out, [a]).run().done == 2
    rec = records(out)["s00-alice-p00-seed42-r0"]
    (video,) = rec["videos"]
    original = (out / video).read_bytes()
    # The record lists a video that is gone: the job runs again. The server numbers its files from 1
    # again (a fresh ComfyUI), so the download meets the old file's name: it gets a new one.
    (out / "jobs" / "s00-alice-p00-seed42-r0.json").write_text(json.dumps({**rec, "videos": [video + ".gone"]}))
    a.counter = 0
    again = runner(world, study, out, [a]).run()
    assert (again.done, again.skipped) == (2, 1)
    (new_video,) = records(out)["s00-alice-p00-seed42-r0"]["videos"]
    assert Path(new_video).parent == Path(video).parent and Path(new_video).name == \
        Path(video).stem + " (1).mp4"
    assert (out / video).read_bytes() == original and (out / new_video).read_bytes() != original
    assert json.loads((out / "jobs" / "superseded" / "s00-alice-p00-seed42-r0.json").read_text())["videos"] == \
        [video + ".gone"]
    assert not list(out.rglob("*.part"))


def test_a_server_that_cannot_run_the_workflow_is_dropped_and_the_other_does_everything(world, tmp_path):
    a, b = FakeServer(world, "http://a:1"), FakeServer(world, "http://b:2")
    b.reject_all = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
                    "node_errors": {"1": {"class_type": "UNETLoader", "errors": [{
                        "type": "value_not_in_list", "message": "Value not in list",
                        "extra_info": {"input_name": "unet_name", "received_value": "wan.safetensors",
                                       "input_config": [["other.safetensors"]]}}]}}}
    out = tmp_path / "study"
    r = runner(world, make_study(tmp_path), out, [a, b])
    outcome = r.run()
    assert (outcome.done, outcome.exit_code) == (12, 0) and len(a.completed) == 12
    assert "'wan.safetensors' is not on the server" in r.stream.text()

    (tmp_path / "one").mkdir()
    alone = FakeServer(world, "http://c:3")
    alone.reject_all = b.reject_all
    stopped = runner(world, make_study(tmp_path / "one"), tmp_path / "one" / "study", [alone]).run()
    assert stopped.all_dead and stopped.exit_code == 3 and "UNETLoader" in stopped.stopped
    assert not records(tmp_path / "one" / "study")  # nothing ran, nothing failed: a rerun does it all


def test_a_changed_study_is_refused_in_the_same_folder_unless_force_new(world, tmp_path):
    a = FakeServer(world, "http://a:1")
    out = tmp_path / "study"
    study = make_study(tmp_path, faces=("alice",), prompts=1)
    assert runner(world, study, out, [a]).run().done == 2
    make_study(tmp_path, faces=("alice",), prompts=1, grid='"Lynx Sampler.ip_scale" = [0.5, 1.0]')
    with pytest.raises(StudyError, match=r"settings differ.*new --out.*--force-new"):
        runner(world, study, out, [a]).run()
    outcome = runner(world, study, out, [a], force_new=True).run()
    assert outcome.done == 2 and outcome.skipped == 0
    (old,) = out.glob("superseded-*")
    assert len(list((old / "jobs").glob("*.json"))) == 2 and json.loads((old / "study.json").read_text())[
        "settings"][0]["values"] == {"11.ip_scale": 0.8}
    assert json.loads((out / "study.json").read_text())["settings"][0]["values"] == {"11.ip_scale": 0.5}


def test_no_server_answers_is_an_error_before_anything_runs(world, tmp_path):
    a = FakeServer(world, "http://a:1")
    a.die()
    with pytest.raises(StudyError, match="no server answers"):
        runner(world, make_study(tmp_path), tmp_path / "study", [a]).run()
    assert not list((tmp_path / "study" / "jobs").glob("*.json"))


def test_study_folder_lock_refuses_a_second_run(tmp_path, world):
    out = tmp_path / "study"
    out.mkdir()
    import os
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / ".lock").write_text(str(proc.pid))
        with pytest.raises(StudyError, match=f"another run \\(process {proc.pid}\\)"):
            runner(world, make_study(tmp_path), out, [FakeServer(world, "http://a:1")]).run()
    finally:
        proc.kill()
        proc.wait()
    # a lock left by a dead process is taken over
    assert runner(world, make_study(tmp_path), out, [FakeServer(world, "http://b:1")]).run().done == 12
    assert not (out / ".lock").exists() and os.getpid()


def test_command_line_errors_exit_2_with_the_fix(tmp_path):
    import io
    import socket

    from lynx_batch.__main__ import main

    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, err = io.StringIO(), io.StringIO()
    code = main(["study", "run", str(make_study(tmp_path)), "--out", str(tmp_path / "s"), "--server",
                 f"127.0.0.1:{port}", "--no-score"], out, err)
    assert code == 2 and f"error: no server answers: http://127.0.0.1:{port}: cannot reach" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert main(["study", "score", str(tmp_path)], out, err) == 2
    assert "is not a study folder (no study.json)" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert main(["study", "run", str(tmp_path / "study.toml"), "--out", str(tmp_path / "s"), "--server", "a:1",
                 "--server", "a:1"], out, err) == 2
    assert "a server is given twice" in err.getvalue()


def test_a_study_folder_that_cannot_be_written_stops_and_takes_our_prompts_off(world, tmp_path, monkeypatch):
    from lynx_batch.study import studydir

    a = FakeServer(world, "http://a:1")

    def full(folder, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(studydir, "write_record", full)
    with pytest.raises(StudyError, match=r"cannot write into .*No space left on device.*run the same command"):
        runner(world, make_study(tmp_path), tmp_path / "study", [a]).run()
    assert not a.waiting and a.running is None and a.interrupted  # nothing of ours is left on the server
