"""``python -m lynx_batch study run`` against two real ComfyUI servers (tiny random models, CPU).

The session server of conftest.py plus a second one started here on a base folder of its own
that shares the first one's models and custom nodes (its own input, output and database: two
ComfyUIs writing one output folder would pick the same file numbers). Needs COMFYUI_PATH; skips
without it.

The tiny models draw noise, in which no detector finds a face; the full study therefore blends
each subject's photo into its decoded frames (core ImageBlend) so both evaluators score real
faces. Its downloaded videos then go back through ComfyUI (Load Video -> Get Video Components ->
Lynx Face Similarity) and the node's numbers must equal the study's; a synthetic insightface
recognition .onnx in a buffalo_l pack is the second evaluator.
"""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest as e2e  # tests/e2e/conftest.py: the server launch helpers
from test_queue_e2e import TINY_LATENT, tiny_api
from tests.test_study_scoring import make_recognition_onnx

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
               prompts=("an astronaut smiles at the camera", "an astronaut waves"),
               face_in_video: bool = False, extra_models_dir: Path | None = None) -> Path:
    """faces x prompts x 2 settings (ip_scale 0.5 and 1.0), seed 5; the faces are the fixture's photo,
    mirrored and scaled (the tiny models' detector finds them all).

    ``face_in_video``: the saved frames are 80 % the subject's photo, 20 % the decoded video (the
    tiny models' noise has no face to score). ``extra_models_dir`` is a second evaluators.models_dirs
    entry (kept out of the session server's models folder, which other tests share)."""
    from PIL import Image, ImageOps

    wf = tiny_api(LITE_API, server.models, "lite")
    wf["9"]["inputs"].update(width=SIZE, height=SIZE)  # EmptyHunyuanLatentVideo
    if face_in_video:
        # node 5 is the face photo the study swaps per subject, 12 the VAE Decode, 13 Lynx Video Combine
        wf["30"] = {"class_type": "ImageBlend", "inputs": {"image1": ["5", 0], "image2": ["12", 0],
                                                           "blend_factor": 0.2, "blend_mode": "normal"}}
        wf["13"]["inputs"]["images"] = ["30", 0]
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
    dirs = [server.models_dir] + ([extra_models_dir] if extra_models_dir else [])
    path = tmp / "study.toml"
    path.write_text('name = "e2e"\nworkflow = "wf.json"\nfaces = "faces"\n'
                    f"prompts = {json.dumps(list(prompts))}\nseeds = [5]\n"
                    '[grid]\n"Lynx Sampler.ip_scale" = [0.5, 1.0]\n'
                    f'[evaluators]\nmodels_dirs = {json.dumps([str(d) for d in dirs])}\n', encoding="utf-8")
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


def with_insightface_pack(models_dir: Path) -> Path:
    """A buffalo_l pack holding only a synthetic recognition model (the scoring tests' builder)."""
    return make_recognition_onnx(models_dir / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx", seed=3)


def comfy_decodes_the_same_pixels(tmp: Path, videos: dict[str, Path]) -> dict[str, bool]:
    """Per video: does ComfyUI's own video decode (Load Video's VideoFromFile, in ComfyUI's python)
    give exactly the study's decoded frames / 255, i.e. the IMAGE Lynx Face Similarity gets?"""
    from lynx_batch.study.scoring import decode_frames
    import numpy as np

    pairs = {}
    for key, video in videos.items():
        np.save(tmp / f"{key}.npy", decode_frames(video))
        pairs[key] = [str(video), str(tmp / f"{key}.npy")]
    script = ("import json, sys, numpy as np, torch\n"
              "from comfy_api.latest import InputImpl\n"
              "out = {}\n"
              "for key, (video, npy) in json.loads(sys.argv[1]).items():\n"
              "    got = InputImpl.VideoFromFile(video).get_components().images\n"
              "    out[key] = bool(torch.equal(got, torch.from_numpy(np.load(npy)) / 255.0))\n"
              "print(json.dumps(out))\n")
    comfy = e2e._comfy_path()
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", script, json.dumps(pairs)],
                          cwd=str(comfy), env=e2e._python_env(comfy), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def face_similarity_in_comfy(server, jobs: dict[str, tuple[Path, Path]]) -> dict[str, tuple[float, str]]:
    """job id -> (mean_similarity, per_frame) of Lynx Face Similarity run in ``server`` on the job's
    video file (Load Video -> Get Video Components) against its identity photo (Load Image -> Lynx
    Encode Face ID, as the study's workflow encodes it). One prompt for every job."""
    prompt, faces, shown = {}, {}, {}
    for n, (jid, (video, face)) in enumerate(sorted(jobs.items())):
        if face not in faces:
            name = f"study_e2e_face_{len(faces)}{face.suffix}"
            shutil.copyfile(face, server.input_dir / name)
            load, enc = str(100 + 2 * len(faces)), str(101 + 2 * len(faces))
            prompt[load] = {"class_type": "LoadImage", "inputs": {"image": name}}
            prompt[enc] = {"class_type": "LynxEncodeFaceID", "inputs": {
                "image": [load, 0], "detector": "auto", "face_select": "largest", "face_index": 0,
                "arcface_backend": "torch", "on_no_face": "error"}}
            faces[face] = enc
        name = f"study_e2e_{jid}{video.suffix}"
        shutil.copyfile(video, server.input_dir / name)
        ids = [str(200 + 5 * n + i) for i in range(5)]
        prompt[ids[0]] = {"class_type": "LoadVideo", "inputs": {"file": name}}
        prompt[ids[1]] = {"class_type": "GetVideoComponents", "inputs": {"video": [ids[0], 0]}}
        prompt[ids[2]] = {"class_type": "LynxFaceSimilarity", "inputs": {
            "images": [ids[1], 0], "face": [faces[face], 0], "detector": "auto"}}
        prompt[ids[3]] = {"class_type": "PreviewAny", "inputs": {"source": [ids[2], 0]}}  # mean_similarity
        prompt[ids[4]] = {"class_type": "PreviewAny", "inputs": {"source": [ids[2], 1]}}  # per_frame
        shown[jid] = (ids[3], ids[4])
    outputs = server.run(prompt, timeout=CLI_TIMEOUT_S)["outputs"]
    return {jid: (float(outputs[m]["text"][0]), outputs[p]["text"][0]) for jid, (m, p) in shown.items()}


def assert_same_scores(study_scores: dict, node_mean: float, node_per_frame: list, where: str) -> None:
    # Both sides run lynx_core's cosine_per_frame on the same pixels; only the torch builds differ
    # (this venv's and ComfyUI's), hence a tolerance far below what one changed pixel would move.
    ours = study_scores["per_frame"]
    assert len(ours) == len(node_per_frame) == TINY_LATENT["length"], where
    assert [v is None for v in ours] == [v is None for v in node_per_frame], where
    assert ours == pytest.approx(node_per_frame, abs=2e-5), where
    assert study_scores["mean"] == pytest.approx(node_mean, abs=2e-5), where


def test_study_over_two_servers_finishes_scores_and_reports(comfy_server, second_server, tmp_path):
    rec_model = with_insightface_pack(tmp_path / "models_extra")
    study = make_study(tmp_path, comfy_server, face_in_video=True, extra_models_dir=tmp_path / "models_extra")
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
    assert "scoring: evaluator insightface v1: " in proc.stderr and "w600k_r50.onnx" in proc.stderr

    # both evaluators, reported separately, with finite numbers on every frame (the photo is in every frame)
    score = {jid: json.loads((out / "scores" / f"{jid}.json").read_text()) for jid in recs}
    subjects = {s["id"]: s["face"] for s in study_json["subjects"]}
    from lynx_batch.study.evaluators import file_sha256
    for jid, data in score.items():
        assert set(data["evaluators"]) == {"facexlib_arcface", "insightface"}, jid
        ins = data["evaluators"]["insightface"]
        assert (ins["model"], ins["pack"]) == ("w600k_r50.onnx", "buffalo_l")
        assert ins["model_sha256"] == file_sha256(rec_model)
        (video,) = data["videos"]
        assert video["path"] == recs[jid]["videos"][0]
        for name in ("facexlib_arcface", "insightface"):
            s = video["scores"][name]
            assert s["frames_total"] == TINY_LATENT["length"] and s["frames_no_face"] == 0, (jid, name)
            assert all(math.isfinite(v) for v in s["per_frame"]) and math.isfinite(s["mean"]), (jid, name)
        # independent models: the numbers differ
        assert video["scores"]["insightface"]["per_frame"] != video["scores"]["facexlib_arcface"]["per_frame"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["evaluators"]) == {"facexlib_arcface", "insightface"}
    assert report["jobs"]["scored"] == 12
    assert sorted((r["setting_id"], r["evaluator"]) for r in report["summary"]) == sorted(
        (sid, name) for sid in values for name in ("facexlib_arcface", "insightface"))
    for row in report["summary"]:
        assert row["n_videos"] == 6 and row["n_subjects"] == 3 and row["videos_no_face"] == 0, row
        assert all(math.isfinite(row[k]) for k in ("mean", "median", "ci_low", "ci_high")), row
    assert sum(r["evaluator"] == "insightface" for r in report["videos"]) == 12
    assert report["videos"][0]["evaluator"] != report["videos"][1]["evaluator"]  # one record per evaluator
    with open(out / "report" / "report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["evaluator"] for r in rows) == ["facexlib_arcface"] * 12 + ["insightface"] * 12
    assert all(math.isfinite(float(r["mean"])) for r in rows)

    # per-video scores equal Lynx Face Similarity's in ComfyUI on the same frames: the study's own
    # video files, decoded by ComfyUI to exactly the pixels the study scored (checked first)
    videos = {jid: out / recs[jid]["videos"][0] for jid in recs}
    same = comfy_decodes_the_same_pixels(tmp_path, videos)
    assert same == {jid: True for jid in recs}, same
    jobs = {jid: (videos[jid], Path(recs[jid].get("face") or subjects[recs[jid]["subject_id"]])) for jid in recs}
    node = face_similarity_in_comfy(comfy_server, jobs)
    for jid, (mean, per_frame) in node.items():
        assert_same_scores(score[jid]["videos"][0]["scores"]["facexlib_arcface"], mean, json.loads(per_frame), jid)


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


