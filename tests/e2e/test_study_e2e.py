"""``python -m lynx_batch study run`` against two real ComfyUI servers (tiny random models, CPU).

The session server of conftest.py plus a second one started here on a base folder of its own
that shares the first one's models and custom nodes (its own input, output and database: two
ComfyUIs writing one output folder would pick the same file numbers). Needs COMFYUI_PATH; skips
without it.
"""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest as e2e  # tests/e2e/conftest.py: the server launch helpers
from test_queue_e2e import TINY_LATENT, tiny_api

ROOT = Path(__file__).resolve().parents[2]
LITE_API = ROOT / "workflows" / "api" / "lynx_lite_t2v_api.json"
CLI_TIMEOUT_S = 1800  # generous: the CPU may be shared; a job takes seconds on an idle one
SIZE = 32  # frames of 32x32 (the queue tests use 64): 12 jobs must stay cheap on a CPU


@pytest.fixture(scope="module")
def second_server(comfy_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base_2")
    for d in ("custom_nodes", "input", "output", "temp", "user"):
        (base / d).mkdir()
    (base / "models").symlink_to(comfy_server.models_dir, target_is_directory=True)
    for entry in (comfy_server.base_dir / "custom_nodes").iterdir():
        (base / "custom_nodes" / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    shutil.copy(comfy_server.input_dir / comfy_server.models["face_image"], base / "input")
    cmd = list(comfy_server.process.args)
    port = e2e._free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--base-directory") + 1] = str(base)
    cmd[cmd.index("--database-url") + 1] = f"sqlite:///{base / 'user' / 'comfyui.db'}"
    comfy = Path(cmd[1]).parent
    log_path = base / "comfyui.log"
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, cwd=str(comfy), env=e2e._python_env(comfy), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = e2e.ComfyServer(url=f"http://127.0.0.1:{port}", base_dir=base, output_dir=base / "output",
                             input_dir=base / "input", models_dir=comfy_server.models_dir,
                             models=comfy_server.models, log_path=log_path, process=process)
    try:
        e2e._wait_until_up(server, e2e.START_TIMEOUT_S)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        log.close()


def make_study(tmp: Path, server, faces: int = 3,
               prompts=("an astronaut smiles at the camera", "an astronaut waves")) -> Path:
    """faces x prompts x 2 settings (ip_scale 0.5 and 1.0), seed 5; the faces are the fixture's photo,
    mirrored and scaled (the tiny models' detector finds them all)."""
    from PIL import Image, ImageOps

    wf = tiny_api(LITE_API, server.models, "lite")
    wf["9"]["inputs"].update(width=SIZE, height=SIZE)  # EmptyHunyuanLatentVideo
    (tmp / "wf.json").write_text(json.dumps(wf))
    faces_count, faces = faces, tmp / "faces"
    faces.mkdir()
    photo = Image.open(server.input_dir / server.models["face_image"]).convert("RGB")
    photo.save(faces / "ann.png")
    ImageOps.mirror(photo).save(faces / "ben.png")
    w, h = photo.size
    photo.resize((w * 3 // 4, h * 3 // 4)).save(faces / "cleo.jpg", quality=95)
    for extra in sorted(faces.iterdir())[faces_count:]:
        extra.unlink()
    path = tmp / "study.toml"
    path.write_text('name = "e2e"\nworkflow = "wf.json"\nfaces = "faces"\n'
                    f"prompts = {json.dumps(list(prompts))}\nseeds = [5]\n"
                    '[grid]\n"Lynx Sampler.ip_scale" = [0.5, 1.0]\n'
                    f'[evaluators]\nmodels_dirs = ["{server.models_dir}"]\n', encoding="utf-8")
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lynx_batch", "study", *args]


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "jobs").glob("*.json")}


def history_prompt(server, prompt_id: str) -> dict:
    return server.request(f"/history/{prompt_id}")[prompt_id]["prompt"][2]


def frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def our_queue(server) -> list:
    q = server.request("/queue")
    return q["queue_running"] + q["queue_pending"]


def test_study_over_two_servers_finishes_scores_and_reports(comfy_server, second_server, tmp_path):
    study = make_study(tmp_path, comfy_server)
    out = tmp_path / "out"
    proc = subprocess.run(cli("run", str(study), "--out", str(out), "--server", comfy_server.url,
                              "--server", second_server.url, "--poll-interval", "0.3"),
                          cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = records(out)
    assert len(recs) == 12 and all(r["status"] == "done" for r in recs.values()), proc.stderr
    assert "12 jobs: 12 done (0 in earlier runs), 0 failed, 0 left" in proc.stdout
    by_server = {url: [r for r in recs.values() if r["server"] == url] for url in (comfy_server.url, second_server.url)}
    assert by_server[comfy_server.url] and by_server[second_server.url]  # both servers worked
    assert sum(map(len, by_server.values())) == 12
    study_json = json.loads((out / "study.json").read_text())
    values = {s["id"]: s["values"]["11.ip_scale"] for s in study_json["settings"]}
    for url, server in ((comfy_server.url, comfy_server), (second_server.url, second_server)):
        for r in by_server[url]:
            sent = history_prompt(server, r["prompt_id_comfy"])
            assert sent["11"]["inputs"]["ip_scale"] == values[r["setting_id"]]
            assert sent["11"]["inputs"]["seed"] == 5 and sent["5"]["inputs"]["image"].startswith("lynx_queue/")
            (video,) = r["videos"]
            assert frames(out / video) == TINY_LATENT["length"]
    assert "ETA" in proc.stderr and "[12/12]" in proc.stderr
    # scored at the end (every job), and reported
    scores = {p.stem for p in (out / "scores").glob("*.json")}
    assert set(recs) <= scores, proc.stderr


def test_ctrl_c_stops_everything_and_a_rerun_resumes(comfy_server, second_server, tmp_path):
    study = make_study(tmp_path, comfy_server, faces=3, prompts=("an astronaut smiles at the camera",))
    out = tmp_path / "out"
    servers = ("--server", comfy_server.url, "--server", second_server.url, "--poll-interval", "0.3", "--no-score",
               "--cancel-wait", "300")
    proc = subprocess.Popen(cli("run", str(study), "--out", str(out), *servers), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while len(list((out / "jobs").glob("*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "stopped by Ctrl-C" in stderr
    first = records(out)
    assert 2 <= len(first) < 6 and all(r["status"] == "done" for r in first.values())
    # nothing of ours is left on either server
    assert our_queue(comfy_server) == [] and our_queue(second_server) == []
    stamps = {k: (out / "jobs" / f"{k}.json").stat().st_mtime_ns for k in first}

    again = subprocess.run(cli("run", str(study), "--out", str(out), *servers), cwd=ROOT, capture_output=True,
                           text=True, timeout=CLI_TIMEOUT_S)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"6 jobs: 6 done ({len(first)} in earlier runs)" in again.stdout
    recs = records(out)
    assert len(recs) == 6 and all(r["status"] == "done" for r in recs.values())
    assert {k: (out / "jobs" / f"{k}.json").stat().st_mtime_ns for k in first} == stamps  # not redone
    run2 = json.loads((out / "runs" / "run_0001.json").read_text())
    assert sorted(run2["ended_this_run"]) == sorted(set(recs) - set(first))
    # one video per job: nothing was downloaded twice
    assert all(len(list((out / "videos" / k).iterdir())) == 1 for k in first)


def test_killing_one_server_mid_study_finishes_everything_on_the_other(comfy_server, second_server, tmp_path):
    study = make_study(tmp_path, comfy_server, faces=2, prompts=("an astronaut smiles at the camera",))
    out = tmp_path / "out"
    proc = subprocess.Popen(cli("run", str(study), "--out", str(out), "--server", comfy_server.url,
                                "--server", second_server.url, "--poll-interval", "0.3", "--server-grace", "2",
                                "--no-score"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CLI_TIMEOUT_S
    # kill it while it runs one of our jobs, after it finished one
    while time.monotonic() < deadline and proc.poll() is None:
        done_there = [r for r in records(out).values() if r["server"] == second_server.url] if out.exists() else []
        if done_there and second_server.request("/queue")["queue_running"]:
            break
        time.sleep(0.1)
    second_server.process.kill()
    second_server.process.wait(timeout=30)
    stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, stdout + stderr
    recs = records(out)
    assert len(recs) == 4 and all(r["status"] == "done" for r in recs.values())
    assert f"{e2e_name(second_server)} is down" in stderr
    run = json.loads((out / "runs" / "run.json").read_text())
    b = run["servers"][second_server.url]
    assert b["state"] == "down" and b["lost"] >= 1
    assert run["servers"][comfy_server.url]["done"] == 4 - b["done"] and b["done"] >= 1
    for r in recs.values():
        (video,) = r["videos"]
        assert (out / video).stat().st_size > 0


def e2e_name(server) -> str:
    return server.url.split("://", 1)[1]


