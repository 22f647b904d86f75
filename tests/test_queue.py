"""lynx_batch's queue tool against a small fake ComfyUI server (stdlib http.server plus a minimal websocket).

The fake server keeps ComfyUI's wire format: /upload/image renames clashing files, /prompt
answers 400 with node_errors for a missing image or a missing model (value_not_in_list with
extra_info, as ComfyUI's validation does), jobs run one at a time and send execution_start,
executing, progress (plus a binary preview frame), executed, execution_error or
execution_success, and finally executing(node=None); /history, /queue (GET, and POST delete),
/view and /interrupt (targeted by prompt_id) behave like ComfyUI's server.py.
"""
import base64
import email.parser
import email.policy
import hashlib
import json
import queue
import select
import struct
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lynx_batch import queue as lq

ROOT = Path(__file__).resolve().parents[1]
FULL_API = ROOT / "workflows" / "api" / "lynx_full_t2v_api.json"
LITE_API = ROOT / "workflows" / "api" / "lynx_lite_t2v_api.json"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakeComfy:
    """Just enough of ComfyUI's server for the queue tool; prompts steer the outcome:
    'FAIL' raises in the sampler, 'SLOW' runs until interrupted, 'STEADY' takes 1.5 s,
    'CRASH' kills the server while it runs, 'REJECT' fails validation. ``unet_choices`` set to a
    list makes UNETLoader validate its file name against it (a missing model)."""

    def __init__(self, tmp: Path) -> None:
        self.input_dir = tmp / "input"
        self.output_dir = tmp / "output"
        self.input_dir.mkdir(parents=True)
        self.output_dir.mkdir()
        self.uploads: list[dict] = []
        self.prompts: list[dict] = []  # /prompt bodies that were accepted
        self.rejected: list[dict] = []  # /prompt bodies that failed validation
        self.interrupts: list[str | None] = []  # prompt_id of each POST /interrupt
        self.deleted: list[str] = []  # prompt ids taken off the queue by POST /queue {"delete"}
        self.unet_choices: list[str] | None = None
        self.history: dict[str, dict] = {}
        self.pending: list[str] = []
        self.running: str | None = None
        self.jobs: "queue.Queue[tuple[str, dict, str]]" = queue.Queue()
        self.clients: dict[str, "queue.Queue[bytes]"] = {}
        self.interrupted = threading.Event()
        self.lock = threading.Lock()
        self.counter = 0
        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        threading.Thread(target=self._worker, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def crash(self) -> None:
        """The process dies: no answer, no history, no more jobs."""
        self.close()

    # -- execution ---------------------------------------------------------------------------
    def send(self, client_id: str, kind: str, data: dict) -> None:
        q = self.clients.get(client_id)
        if q is not None:
            q.put(_ws_frame(json.dumps({"type": kind, "data": data}).encode(), opcode=1))

    def _worker(self) -> None:
        while not self.stop.is_set():
            try:
                pid, prompt, cid = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            with self.lock:
                if pid not in self.pending:  # taken off the queue by POST /queue {"delete"}
                    continue
                self.pending.remove(pid)
                self.running = pid
            self.interrupted.clear()
            messages = []

            def msg(kind, data):
                data = {**data, "prompt_id": pid}
                messages.append([kind, data])
                self.send(cid, kind, data)

            msg("execution_start", {})
            sampler = next(k for k, v in prompt.items() if v["class_type"] == "LynxSampler")
            text_node = prompt[sampler]["inputs"]["positive"][0]
            text = prompt[text_node]["inputs"]["text"]
            outputs = {}
            status = "success"
            self.send(cid, "executing", {"node": "6", "prompt_id": pid})
            outputs["6"] = {"images": [{"filename": f"preview_{pid}.png", "subfolder": "", "type": "temp"}],
                            "lynx_faces": ["1 face found, using #0"]}
            (self.output_dir / f"preview_{pid}.png").write_bytes(b"temp preview")
            self.send(cid, "executed", {"node": "6", "output": outputs["6"], "prompt_id": pid})
            self.send(cid, "executing", {"node": sampler, "prompt_id": pid})
            if "CRASH" in text:
                self.interrupted.wait(0.4)  # long enough for a poll to see it running
                self.crash()
                return
            if "STEADY" in text:
                self.interrupted.wait(1.5)
            if "SLOW" in text:
                while not self.interrupted.wait(0.02):
                    pass
                msg("execution_interrupted", {"node_id": sampler, "node_type": "LynxSampler", "executed": []})
                status = "error"
            else:
                for step in (1, 2, 3):
                    self.send(cid, "progress", {"value": step, "max": 3, "node": sampler, "prompt_id": pid})
                    q = self.clients.get(cid)
                    if q is not None:  # a latent preview: binary frames must be skipped
                        q.put(_ws_frame(b"\x00\x00\x00\x01" + b"\x89PNG fake", opcode=2))
                if "FAIL" in text:
                    msg("execution_error", {"node_id": sampler, "node_type": "LynxSampler", "executed": [],
                                            "exception_message": "CUDA out of memory (fake)",
                                            "exception_type": "torch.OutOfMemoryError", "traceback": []})
                    status = "error"
                else:
                    with self.lock:
                        self.counter += 1
                        name = f"lynx_{self.counter:05d}_.mp4"
                    (self.output_dir / "Lynx").mkdir(exist_ok=True)
                    (self.output_dir / "Lynx" / name).write_bytes(f"video for {text} seed "
                                                                  f"{prompt[sampler]['inputs']['seed']}".encode())
                    outputs["13"] = {"videos": [{"filename": name, "subfolder": "Lynx", "type": "output",
                                                 "format": "video/h264-mp4", "frame_rate": 16.0}]}
                    self.send(cid, "executed", {"node": "13", "output": outputs["13"], "prompt_id": pid})
                    msg("execution_success", {})
            with self.lock:
                self.history[pid] = {"prompt": [0, pid, prompt, {"client_id": cid}, []],
                                     "outputs": outputs,
                                     "status": {"status_str": status, "completed": status == "success",
                                                "messages": messages}}
                self.running = None
            self.send(cid, "executing", {"node": None, "prompt_id": pid})

    # -- HTTP ----------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", ctype="application/json"):
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/ws":
                    return self._websocket(q.get("clientId", ""))
                if url.path == "/system_stats":
                    return self._send(200, {"system": {"comfyui_version": "fake"}, "devices": []})
                if url.path.startswith("/history/"):
                    pid = url.path[len("/history/"):]
                    with fake.lock:
                        entry = fake.history.get(pid)
                    return self._send(200, {pid: entry} if entry else {})
                if url.path == "/queue":
                    with fake.lock:
                        running = [[0, fake.running, {}, {}, []]] if fake.running else []
                        pending = [[1, p, {}, {}, []] for p in fake.pending]
                    return self._send(200, {"queue_running": running, "queue_pending": pending})
                if url.path == "/view":
                    base = fake.output_dir if q.get("type", "output") in ("output", "temp") else fake.input_dir
                    path = base / q.get("subfolder", "") / q["filename"]
                    if not path.is_file():
                        return self._send(404, b"", "text/plain")
                    return self._send(200, path.read_bytes(), "application/octet-stream")
                self._send(404, b"", "text/plain")

            def do_POST(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/upload/image":
                    return self._upload()
                if url.path == "/prompt":
                    return self._prompt(json.loads(self._body()))
                if url.path == "/interrupt":
                    body = json.loads(self._body() or b"{}")
                    fake.interrupts.append(body.get("prompt_id"))
                    if body.get("prompt_id") in (None, fake.running):
                        fake.interrupted.set()
                    return self._send(200, b"", "text/plain")
                if url.path == "/queue":
                    body = json.loads(self._body())
                    with fake.lock:
                        for pid in body.get("delete", []):
                            if pid in fake.pending:
                                fake.pending.remove(pid)
                                fake.deleted.append(pid)
                    return self._send(200, b"", "text/plain")
                self._send(404, b"", "text/plain")

            def _upload(self):
                raw = self._body()
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                form, image = {}, None
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if part.get_filename():
                        image = (part.get_filename(), part.get_payload(decode=True))
                    else:
                        form[name] = part.get_content().strip()
                if image is None:
                    return self._send(400, b"", "text/plain")
                folder = fake.input_dir / form.get("subfolder", "")
                folder.mkdir(parents=True, exist_ok=True)
                name, data = image
                stem, suffix = Path(name).stem, Path(name).suffix
                i = 1
                while (folder / name).exists() and form.get("overwrite") != "true":
                    if (folder / name).read_bytes() == data:
                        break  # same content: ComfyUI reuses the file
                    name = f"{stem} ({i}){suffix}"
                    i += 1
                (folder / name).write_bytes(data)
                fake.uploads.append({"name": name, "form": form, "size": len(data)})
                self._send(200, {"name": name, "subfolder": form.get("subfolder", ""), "type": "input"})

            def _prompt(self, body):
                prompt = body["prompt"]
                for nid, node in prompt.items():
                    if node["class_type"] == "UNETLoader" and fake.unet_choices is not None and \
                            node["inputs"]["unet_name"] not in fake.unet_choices:
                        fake.rejected.append(body)
                        name = node["inputs"]["unet_name"]
                        return self._send(400, {
                            "error": {"type": "prompt_outputs_failed_validation",
                                      "message": "Prompt outputs failed validation", "details": "",
                                      "extra_info": {}},
                            "node_errors": {nid: {"errors": [{
                                "type": "value_not_in_list", "message": "Value not in list",
                                "details": f"unet_name: '{name}' not in {fake.unet_choices}",
                                "extra_info": {"input_name": "unet_name", "input_config": [fake.unet_choices, {}],
                                               "received_value": name}}],
                                "dependent_outputs": ["13"], "class_type": "UNETLoader"}}})
                    if node["class_type"] == "LoadImage":
                        if not (fake.input_dir / node["inputs"]["image"]).is_file():
                            fake.rejected.append(body)
                            return self._send(400, {
                                "error": {"type": "prompt_outputs_failed_validation",
                                          "message": "Prompt outputs failed validation", "details": ""},
                                "node_errors": {nid: {"errors": [{
                                    "type": "custom_validation_failed", "message": "Invalid image file",
                                    "details": f"image - Invalid image file: {node['inputs']['image']}"}],
                                    "class_type": "LoadImage"}}})
                    if node["class_type"] == "CLIPTextEncode" and "REJECT" in node["inputs"]["text"]:
                        fake.rejected.append(body)
                        return self._send(400, {"error": {"type": "x", "message": "Prompt outputs failed "
                                                          "validation", "details": ""},
                                                "node_errors": {nid: {"errors": [{"message": "text rejected",
                                                                                  "details": "REJECT"}]}}})
                pid = f"pid-{len(fake.prompts) + 1:03d}"
                fake.prompts.append(body)
                with fake.lock:
                    fake.pending.append(pid)
                fake.jobs.put((pid, prompt, body.get("client_id", "")))
                self._send(200, {"prompt_id": pid, "number": len(fake.prompts), "node_errors": {}})

            def _websocket(self, client_id):
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                q = fake.clients.setdefault(client_id, queue.Queue())
                q.put(_ws_frame(json.dumps({"type": "status", "data": {"sid": client_id, "status": {
                    "exec_info": {"queue_remaining": 0}}}}).encode(), opcode=1))
                try:
                    while not fake.stop.is_set():
                        if select.select([self.connection], [], [], 0)[0] and _ws_read_is_close(self.rfile):
                            self.wfile.write(_ws_frame(b"", opcode=8))  # answer the client's close
                            break
                        try:
                            frame = q.get(timeout=0.02)
                        except queue.Empty:
                            continue
                        self.wfile.write(frame)
                        self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

        return Handler


def _ws_read_is_close(rfile) -> bool:
    """Read one (masked) client frame; True when it is a close frame or the peer is gone."""
    head = rfile.read(2)
    if len(head) < 2:
        return True
    n = head[1] & 0x7F
    if n == 126:
        n = struct.unpack(">H", rfile.read(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", rfile.read(8))[0]
    rfile.read((4 if head[1] & 0x80 else 0) + n)
    return head[0] & 0x0F == 8


def _ws_frame(payload: bytes, opcode: int) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


@pytest.fixture
def fake(tmp_path):
    server = FakeComfy(tmp_path / "server")
    yield server
    server.close()


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "anna.png").write_bytes(b"\x89PNG anna")
    (folder / "ben.jpg").write_bytes(b"\xff\xd8 ben")
    (folder / "notes.txt").write_text("not a photo")
    return folder


def _run(args, capsys):
    code = lq.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- the whole batch ---------------------------------------------------------------------------


@pytest.mark.parametrize("websocket", [True, False], ids=["websocket", "polling"])
def test_batch_uploads_queues_follows_and_collects(fake, photos, tmp_path, capsys, websocket):
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text(
        "prompt,negative,seed,face\n"
        "a man rides a bike,,7,\n"
        "FAIL this one,,,\n"
        "a woman sings,blurry,11,ben.jpg\n", encoding="utf-8")
    out = tmp_path / "results"
    args = ["--server", fake.url, "--workflow", FULL_API, "--faces", photos, "--prompts", csv_file,
            "--out", out, "--poll-interval", "0.05", "--seed", "1234"]
    if not websocket:
        args.append("--no-websocket")
    code, stdout, stderr = _run(args, capsys)

    # 2 photos x 2 rows + 1 row with its own photo; the two FAIL jobs do not stop the batch
    assert code == 1
    assert len(fake.prompts) == 5
    # each distinct photo is uploaded once, into our subfolder, never overwriting
    assert sorted(u["name"] for u in fake.uploads) == ["anna.png", "ben.jpg"]
    assert all(u["form"] == {"type": "input", "subfolder": "lynx_queue", "overwrite": "false"}
               for u in fake.uploads)

    sent = [b["prompt"] for b in fake.prompts]
    assert [p["5"]["inputs"]["image"] for p in sent] == [
        "lynx_queue/anna.png", "lynx_queue/ben.jpg", "lynx_queue/anna.png", "lynx_queue/ben.jpg",
        "lynx_queue/ben.jpg"]
    assert [p["7"]["inputs"]["text"] for p in sent] == ["a man rides a bike"] * 2 + ["FAIL this one"] * 2 + [
        "a woman sings"]
    # the row seed, else --seed; sampler and reference seeds always agree
    assert [p["11"]["inputs"]["seed"] for p in sent] == [7, 7, 1234, 1234, 11]
    assert all(p["10"]["inputs"]["seed"] == p["11"]["inputs"]["seed"] for p in sent)
    original_negative = json.loads(FULL_API.read_text())["8"]["inputs"]["text"]
    assert [p["8"]["inputs"]["text"] for p in sent] == [original_negative] * 4 + ["blurry"]
    assert len({b["client_id"] for b in fake.prompts}) == 1

    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report] == ["ok", "ok", "failed", "failed", "ok"]
    for r in report[2:4]:
        assert "LynxSampler (node 11)" in r["error"]
        assert "CUDA out of memory (fake)" in r["error"]
        assert r["outputs"] == []
    # outputs come from /view with their content, and temp previews are left out
    for r in (report[0], report[1], report[4]):
        assert len(r["outputs"]) == 1
        path = Path(r["outputs"][0])
        assert path.parent == out and path.suffix == ".mp4"
        server_file = fake.output_dir / "Lynx" / path.name.split("_", 2)[2]
        assert path.read_bytes() == server_file.read_bytes()
    assert Path(report[0]["outputs"][0]).name.startswith("001_anna_")
    assert Path(report[4]["outputs"][0]).name.startswith("005_ben_")
    assert not list(out.glob("*preview*"))

    # summary table: one row per job and the totals
    assert "3 ok, 2 failed, 5 jobs" in stdout
    rows = [line for line in stdout.splitlines() if line[:1].isdigit() and "jobs" not in line]
    assert [row.split()[1] for row in rows] == ["ok", "ok", "failed", "failed", "ok"]
    if websocket:
        assert "LynxSampler #11 3/3" in stderr  # step progress only comes over the websocket
    else:
        assert "3/3" not in stderr
    assert "FAILED: LynxSampler (node 11)" in stderr


def test_rejected_job_reports_node_errors_and_batch_goes_on(fake, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(["--server", fake.url, "--workflow", LITE_API, "--faces", photos / "anna.png",
                            "--prompt", "REJECT me", "--prompt", "fine", "--out", out,
                            "--poll-interval", "0.05"], capsys)
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert report[0]["status"] == "failed" and report[0]["prompt_id"] is None
    assert "Prompt outputs failed validation" in report[0]["error"]
    assert "node 7 (CLIPTextEncode): text rejected: REJECT" in report[0]["error"]
    assert report[1]["status"] == "ok" and len(report[1]["outputs"]) == 1
    assert len(fake.prompts) == 1


def test_outputs_are_never_overwritten(fake, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png", "--prompt", "same",
            "--out", out, "--poll-interval", "0.05", "-q"]
    assert _run(args, capsys)[0] == 0
    first = sorted(out.glob("*.mp4"))
    assert len(first) == 1
    first_bytes = first[0].read_bytes()
    # the next run's server file has the same name (fresh server counter), so ours must get a new one
    fake.counter = 0
    assert _run(args, capsys)[0] == 0
    files = sorted(out.glob("*.mp4"))
    assert len(files) == 2
    assert first[0].read_bytes() == first_bytes
    assert {f.name for f in files} == {first[0].name, first[0].stem + " (1).mp4"}


def test_timeout_interrupts_the_job_and_the_batch_goes_on(fake, photos, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = _run(["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "ben.jpg",
                            "--prompt", "SLOW walk", "--prompt", "quick walk", "--out", out, "--timeout", "0.3",
                            "--poll-interval", "0.05"], capsys)
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert report[0]["status"] == "failed"
    assert report[0]["error"].startswith("timed out after 0.3 s")
    assert "interrupted at LynxSampler" in report[0]["error"]
    assert report[1]["status"] == "ok"
    assert "interrupting" in stderr


def test_unreachable_server_exits_2(tmp_path, capsys, photos):
    # a port nobody listens on: bind and close
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    code, _, err = _run(["--server", f"127.0.0.1:{port}", "--workflow", FULL_API, "--prompt", "x",
                         "--faces", photos, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "cannot reach the ComfyUI server" in err


def test_missing_websocket_client_falls_back_to_polling(fake, photos, tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "websocket", None)  # `import websocket` now raises ImportError
    code, _, err = _run(["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png",
                         "--prompt", "hello", "--out", tmp_path / "o", "--poll-interval", "0.05"], capsys)
    assert code == 0
    assert "websocket-client is not installed" in caplog.text
    assert not fake.clients  # nobody connected to /ws


# -- pieces --------------------------------------------------------------------------------------


def test_locate_targets_follows_the_graph():
    for path, seeds in ((FULL_API, [("10", "seed"), ("11", "seed")]), (LITE_API, [("11", "seed")])):
        wf = lq.load_workflow(path)
        t = lq.locate_targets(wf)
        assert (t.face_node, t.prompt_node, t.negative_node) == ("5", "7", "8")
        assert t.seed_inputs == seeds


def test_locate_targets_by_title_and_override():
    wf = lq.load_workflow(FULL_API)
    # cut the graph links: titles must still find the nodes
    wf["6"]["inputs"]["image"] = "not a link"
    wf["11"]["inputs"]["positive"] = wf["11"]["inputs"]["negative"] = None
    wf["99"] = {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Background"}}
    t = lq.locate_targets(wf)
    assert (t.face_node, t.prompt_node, t.negative_node) == ("5", "7", "8")
    t = lq.locate_targets(wf, face_node="99", prompt_node="8", negative_node="7")
    assert (t.face_node, t.prompt_node, t.negative_node) == ("99", "8", "7")
    with pytest.raises(lq.QueueError, match="--face-node: node 42 is not in the workflow"):
        lq.locate_targets(wf, face_node="42")
    with pytest.raises(lq.QueueError, match="--prompt-node: node 5 .*has no 'text' input"):
        lq.locate_targets(wf, prompt_node="5")


def test_apply_job_copies_and_fills(tmp_path):
    wf = lq.load_workflow(FULL_API)
    t = lq.locate_targets(wf)
    job = lq.Job(index=1, prompt="p", negative="n", seed=5, face=tmp_path / "a.png")
    new = lq.apply_job(wf, t, job, "lynx_queue/a.png")
    assert new["5"]["inputs"]["image"] == "lynx_queue/a.png"
    assert (new["7"]["inputs"]["text"], new["8"]["inputs"]["text"]) == ("p", "n")
    assert new["10"]["inputs"]["seed"] == new["11"]["inputs"]["seed"] == 5
    shipped = json.loads(FULL_API.read_text())
    assert wf == shipped  # the original is untouched
    keep = lq.apply_job(wf, t, lq.Job(index=2, prompt="q"), None)
    assert keep["11"]["inputs"]["seed"] == shipped["11"]["inputs"]["seed"]
    assert keep["8"]["inputs"]["text"] == wf["8"]["inputs"]["text"]


def test_load_workflow_rejects_ui_format(tmp_path):
    ui = sorted((ROOT / "workflows").glob("*.json"))[0]  # the UI-format templates next to api/
    with pytest.raises(lq.QueueError, match="UI-format workflow"):
        lq.load_workflow(ui)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(lq.QueueError, match="not valid JSON"):
        lq.load_workflow(bad)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": json.loads(FULL_API.read_text()), "client_id": "x"}))
    assert lq.load_workflow(body)["11"]["class_type"] == "LynxSampler"


def test_load_prompts_text_and_csv(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nfirst prompt\n\n  second prompt  \n", encoding="utf-8")
    assert [r["prompt"] for r in lq.load_prompts(txt)] == ["first prompt", "second prompt"]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('Prompt,Seed\n"a, with comma",3\nb,\n', encoding="utf-8")
    rows = lq.load_prompts(csv_file)
    assert [(r["prompt"], r.get("seed")) for r in rows] == [("a, with comma", 3), ("b", None)]
    csv_file.write_text("text\nx\n")
    with pytest.raises(lq.QueueError, match="no 'prompt' column"):
        lq.load_prompts(csv_file)
    csv_file.write_text("prompt,seed\nx,abc\n")
    with pytest.raises(lq.QueueError, match="line 2: seed 'abc' is not an integer"):
        lq.load_prompts(csv_file)
    with pytest.raises(lq.QueueError, match="does not exist"):
        lq.load_prompts(tmp_path / "missing.txt")


def test_make_jobs_pairs_prompts_and_faces(tmp_path, photos):
    faces = lq.find_faces(photos)
    assert [f.name for f in faces] == ["anna.png", "ben.jpg"]
    rows = [{"prompt": "x"}, {"prompt": "y", "face": "ben.jpg", "seed": 3}]
    jobs = lq.make_jobs(rows, faces, tmp_path / "p.csv", photos, seed=9)
    assert [(j.index, j.prompt, j.face.name, j.seed) for j in jobs] == [
        (1, "x", "anna.png", 9), (2, "x", "ben.jpg", 9), (3, "y", "ben.jpg", 3)]
    with pytest.raises(lq.QueueError, match="face photo 'zoe.png' not found"):
        lq.make_jobs([{"prompt": "z", "face": "zoe.png", "line": 4}], faces, tmp_path / "p.csv", photos)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(lq.QueueError, match="has no image"):
        lq.find_faces(empty)


def test_output_files_and_history_error():
    entry = {"outputs": {"13": {"videos": [{"filename": "v.mp4", "subfolder": "Lynx", "type": "output"}],
                                "animated": [True]},
                         "6": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}],
                               "lynx_faces": ["1 face"]}},
             "status": {"status_str": "error", "completed": False, "messages": [
                 ["execution_start", {"prompt_id": "x"}],
                 ["execution_error", {"node_id": "6", "node_type": "LynxEncodeFaceID",
                                      "exception_type": "ValueError", "exception_message": "no face found"}]]}}
    assert [f["filename"] for f in lq.output_files(entry)] == ["v.mp4"]
    assert [f["filename"] for f in lq.output_files(entry, include_temp=True)] == ["p.png", "v.mp4"]
    assert lq.history_error(entry) == "LynxEncodeFaceID (node 6): ValueError: no face found"
    assert lq.history_error({"status": {"status_str": "success", "completed": True, "messages": []}}) is None


def test_summary_table_columns(tmp_path):
    ok = lq.JobResult(lq.Job(1, "a", face=Path("anna.png"), seed=3), status="ok", started=0.0, finished=2.5,
                      outputs=[tmp_path / "001_anna_x.mp4"])
    bad = lq.JobResult(lq.Job(2, "b"), status="failed", error="boom\nline2")
    text = lq.format_summary([ok, bad])
    lines = text.splitlines()
    assert lines[0].split() == ["#", "status", "face", "seed", "time", "result"]
    assert lines[1].split() == ["1", "ok", "anna.png", "3", "2.5s", "001_anna_x.mp4"]
    assert lines[2].split()[:3] == ["2", "failed", "-"] and lines[2].endswith("boom line2")
    assert lines[-1] == "1 ok, 1 failed, 2 jobs"


def test_script_mode_does_not_shadow_stdlib(tmp_path):
    """`python nodes/queue.py` (the old name) and `python lynx_batch` (the package folder) run from
    any folder: neither lets a file named like stdlib `queue` shadow the stdlib."""
    import subprocess

    for argv, note in (([str(ROOT / "nodes" / "queue.py"), "--help"], True),
                       ([str(ROOT / "lynx_batch"), "queue", "--help"], False)):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "--workflow" in proc.stdout and "--on-ctrl-c" in proc.stdout
        assert "python -m lynx_batch queue" in proc.stdout  # the usage line names the new command
        assert ("is now `python -m lynx_batch queue`" in proc.stderr) is note


# -- issue 9: nothing lost, nothing misreported --------------------------------------------------


def _press_ctrl_c_when(condition, timeout=20.0):
    """Send SIGINT to the main thread (what Ctrl-C does) once condition() holds, from a helper thread.
    A real signal, unlike _thread.interrupt_main, also breaks a blocking socket read at once."""
    import _thread
    import signal
    import time

    done = threading.Event()  # set by the test once the tool returned: never signal pytest itself

    def watch():
        end = time.monotonic() + timeout
        while time.monotonic() < end and not done.is_set():
            if condition():
                time.sleep(0.15)  # let the tool get back to following the jobs
                if done.is_set():
                    return
                if hasattr(signal, "pthread_kill"):
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                else:
                    _thread.interrupt_main()
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return done


def _run_catching_ctrl_c(args, capsys, done):
    try:
        return _run(args, capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the queue tool")
    finally:
        done.set()


def test_reused_out_folder_never_replaces_the_report(fake, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png", "--out", out,
            "--poll-interval", "0.05", "-q"]
    code, stdout, _ = _run(args + ["--prompt", "first run"], capsys)
    assert code == 0 and f"report: {out / 'report.json'}" in stdout
    first = (out / "report.json").read_bytes()
    code, stdout, _ = _run(args + ["--prompt", "second run"], capsys)
    assert code == 0
    assert (out / "report.json").read_bytes() == first  # the first run's report is untouched
    assert f"report: {out / 'report_0001.json'}" in stdout
    assert json.loads((out / "report_0001.json").read_text())[0]["prompt"] == "second run"
    assert not list(out.glob(".*")), "a temporary file was left behind"


def test_write_new_file_is_atomic_and_numbered(tmp_path):
    from lynx_batch.files import numbered_with_counter, write_new_file

    (tmp_path / "report.json").write_text("old")
    (tmp_path / "report_0001.json").write_text("older")
    path = write_new_file(tmp_path, "report.json", b"new", numbered_with_counter)
    assert path.name == "report_0002.json" and path.read_bytes() == b"new"
    assert (tmp_path / "report.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report_0001.json", "report_0002.json"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be-bom"])
def test_prompts_files_in_utf8_or_with_a_bom_are_read(tmp_path, encoding):
    text = "prompt,seed\nune femme sourit à la caméra,3\n日本の庭園を歩く,4\n"
    if encoding == "utf-16-be-bom":
        data = b"\xfe\xff" + text.encode("utf-16-be")
    else:
        data = text.encode(encoding)  # Python's "utf-16" writes a BOM, as Windows' "Unicode" does
    (tmp_path / "p.csv").write_bytes(data)
    rows = lq.load_prompts(tmp_path / "p.csv")
    assert [(r["prompt"], r["seed"]) for r in rows] == [("une femme sourit à la caméra", 3),
                                                         ("日本の庭園を歩く", 4)]
    (tmp_path / "p.txt").write_bytes(data)
    assert lq.load_prompts(tmp_path / "p.txt")[0]["prompt"] == "prompt,seed"


def test_prompts_file_that_is_not_utf8_names_the_byte_and_the_fix(fake, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first prompt\nune femme à la plage\n".encode("latin-1"))
    with pytest.raises(lq.QueueError) as e:
        lq.load_prompts(bad)
    msg = str(e.value)
    assert str(bad) in msg and "not valid UTF-8" in msg
    assert "byte 0xe0 at byte 23 (line 2, column 11)" in msg
    assert "save it as UTF-8" in msg
    code, _, err = _run(["--server", fake.url, "--workflow", FULL_API, "--prompts", bad, "--out", tmp_path / "o"],
                        capsys)
    assert code == 2 and "error: --prompts:" in err and "Traceback" not in err
    assert fake.prompts == [] and fake.uploads == []


def test_out_pointing_at_a_file_is_a_clear_error(fake, photos, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, _, err = _run(["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png",
                         "--prompt", "x", "--out", target], capsys)
    assert code == 2
    assert f"--out: {target} is a file, not a folder" in err
    assert target.read_text() == "keep me"
    assert fake.prompts == [] and fake.uploads == []  # nothing was sent before the check


@pytest.mark.parametrize("websocket", [True, False], ids=["websocket", "polling"])
def test_server_dying_mid_batch_still_reports_every_job(fake, photos, tmp_path, capsys, websocket):
    out = tmp_path / "out"
    args = ["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png", "--prompt", "fine",
            "--prompt", "CRASH here", "--prompt", "later", "--out", out, "--poll-interval", "0.05",
            "--server-grace", "0.3"]
    code, stdout, err = _run(args + ([] if websocket else ["--no-websocket"]), capsys)
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report] == ["ok", "unknown", "unknown"]
    assert len(report[0]["outputs"]) == 1 and Path(report[0]["outputs"][0]).is_file()
    assert "while this job ran" in report[1]["error"]
    assert "waiting in the server queue" in report[2]["error"]
    assert "1 ok, 0 failed, 2 unknown, 3 jobs" in stdout
    assert f"error: the ComfyUI server at {fake.url} stopped answering" in err


def test_server_gone_before_sending_leaves_the_rest_not_run(fake, photos, tmp_path, capsys, monkeypatch):
    sent = []
    real = lq.ComfyClient.queue_prompt

    def queue_then_die(self, wf, cid):
        if sent:
            fake.crash()
        sent.append(1)
        return real(self, wf, cid)

    monkeypatch.setattr(lq.ComfyClient, "queue_prompt", queue_then_die)
    out = tmp_path / "out"
    code, stdout, _ = _run(["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png",
                            "--prompt", "a", "--prompt", "b", "--prompt", "c", "--out", out, "--no-websocket",
                            "--poll-interval", "0.05", "--server-grace", "0.2"], capsys)
    assert code == 1
    assert [r["status"] for r in json.loads((out / "report.json").read_text())] == ["unknown", "not_run", "not_run"]
    assert "2 not run" in stdout


def test_workflow_the_server_cannot_run_stops_at_the_first_job(fake, photos, tmp_path, capsys):
    fake.unet_choices = [f"model_{i}.safetensors" for i in range(8)]
    out = tmp_path / "out"
    code, stdout, err = _run(["--server", fake.url, "--workflow", FULL_API, "--faces", photos,
                              "--prompt", "one", "--prompt", "two", "--out", out, "--poll-interval", "0.05"],
                             capsys)
    assert code == 2
    assert len(fake.rejected) == 1 and fake.prompts == []  # the other three were never sent
    # one message, naming the node, the input and the missing file, with a few of the server's files
    assert err.count("is not on the server") == 1
    assert "node 1 (UNETLoader) input 'unet_name': 'wan2.1_t2v_14B_bf16.safetensors' is not on the server" in err
    assert "model_0.safetensors" in err and "model_7.safetensors" not in err
    assert "3 more job(s) were not sent" in err
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report] == ["failed", "not_run", "not_run", "not_run"]
    assert "1 ok" not in stdout and "0 ok, 1 failed, 3 not run, 4 jobs" in stdout


def test_is_workflow_error_tells_job_errors_from_workflow_errors():
    from lynx_batch.server_errors import is_workflow_error

    wf = lq.load_workflow(FULL_API)
    mine = lq.locate_targets(wf).job_inputs()

    def answer(nid, input_name=None):
        extra = {"input_name": input_name} if input_name else {}
        return {"error": {"message": "Prompt outputs failed validation"},
                "node_errors": {nid: {"errors": [{"type": "x", "message": "m", "extra_info": extra}]}}}

    assert not is_workflow_error(answer("5", "image"), mine)  # our photo
    assert not is_workflow_error(answer("7"), mine)  # our prompt node, no input named
    assert not is_workflow_error(answer("11", "seed"), mine)  # our seed
    assert is_workflow_error(answer("11", "steps"), mine)  # a value no job changes
    assert is_workflow_error(answer("3", "vae_name"), mine)  # a missing model
    assert is_workflow_error({"error": {"type": "invalid_prompt", "message": "node X does not exist"},
                              "node_errors": {}}, mine)


def test_error_texts_have_no_doubled_braces(tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(lq.QueueError) as e:
        lq.load_workflow(listing)
    assert "(expected {node_id: {class_type, inputs}})" in str(e.value)
    import re

    for path in sorted((ROOT / "lynx_batch").glob("*.py")):
        for m in re.finditer(r'(?<![f{])"[^"\n]*\{\{[^"\n]*"', path.read_text()):
            pytest.fail(f"{path.name}: doubled brace in a plain string {m.group(0)}")


def test_websocket_client_is_a_declared_dependency():
    reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert any(r.lower().startswith("websocket-client") for r in reqs)
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = pyproject[pyproject.index("\ndependencies = ["):].split("]", 1)[0]  # tomllib is 3.11+
    assert '"websocket-client' in deps


def test_ctrl_c_interrupts_the_running_job_and_empties_our_queue(fake, photos, tmp_path, capsys):
    out = tmp_path / "out"
    done = _press_ctrl_c_when(lambda: len(fake.prompts) == 3 and fake.running == "pid-001")
    code, stdout, err = _run_catching_ctrl_c(
        ["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png", "--prompt", "SLOW a",
         "--prompt", "b", "--prompt", "c", "--out", out, "--no-websocket", "--poll-interval", "0.05"], capsys,
        done)
    assert code == 130
    assert fake.interrupts[:1] == ["pid-001"] and set(fake.interrupts) == {"pid-001"}  # targeted, ours only
    assert fake.deleted == ["pid-002", "pid-003"]
    assert set(fake.history) == {"pid-001"}  # the removed jobs never ran
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report] == ["interrupted", "removed", "removed"]
    assert report[0]["error"].startswith("interrupted on the server by Ctrl-C")
    assert "0 ok, 0 failed, 1 interrupted, 2 removed, 3 jobs" in stdout
    assert "Ctrl-C: interrupting running job 1 on the server, removing 2 waiting job(s)" in err


def test_ctrl_c_with_wait_lets_the_running_job_finish_and_downloads_it(fake, photos, tmp_path, capsys):
    out = tmp_path / "out"
    done = _press_ctrl_c_when(lambda: len(fake.prompts) == 2 and fake.running == "pid-001")
    code, stdout, _ = _run_catching_ctrl_c(
        ["--server", fake.url, "--workflow", FULL_API, "--faces", photos / "anna.png", "--prompt", "STEADY a",
         "--prompt", "b", "--out", out, "--on-ctrl-c", "wait", "--poll-interval", "0.05"], capsys, done)
    assert code == 130
    assert fake.interrupts == [] and fake.deleted == ["pid-002"]
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report] == ["ok", "removed"]
    (video,) = [Path(p) for p in report[0]["outputs"]]
    assert video.read_bytes().startswith(b"video for STEADY a")
    assert "1 ok, 0 failed, 1 removed, 2 jobs" in stdout


def test_the_custom_node_import_never_reaches_the_batch_tools():
    """ComfyUI imports the pack's __init__.py and nodes/: none of it may import lynx_batch or the shim."""
    import ast

    sources = [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py"))]
    for path in sources:
        if path.name == "queue.py":
            continue  # the shim itself, only ever run as a command
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            for name in names:
                assert not name.lstrip(".").startswith("lynx_batch"), f"{path.name} imports {name}"
                assert not name.endswith(".queue") and name != "queue", f"{path.name} imports {name}"
