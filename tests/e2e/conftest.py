"""End-to-end fixtures: a real ComfyUI server on the CPU with this pack and tiny random models.

Set ``COMFYUI_PATH`` to a ComfyUI checkout to run these tests; without it they skip. The server
runs with ``COMFYUI_PYTHON`` (default: this interpreter), which needs ComfyUI's requirements and
this pack's; ``LYNX_E2E_KEEP=1`` keeps the temporary ComfyUI base folder for inspection.

``comfy_server`` (session scope) starts ``main.py --cpu`` on a free loopback port with
``--base-directory`` pointing at a fresh temporary tree::

    base/custom_nodes/ComfyUI-Lynx     -> this repository (symlink)
    base/custom_nodes/lynx_e2e_support -> tests/e2e/comfy_support (test-only tiny UMT5 loader)
    base/models/{diffusion_models,vae,text_encoders,lynx,facexlib}/   tiny random models
    base/input/   the face photo          base/output/   what workflows write

and yields a :class:`ComfyServer`. ``models`` holds the file names: ``diffusion_model`` (UNETLoader),
``vae`` (VAELoader), ``text_encoder`` (load it with ``LynxE2ETinyUMT5Loader``, see
``ComfyServer.clip_loader_node()``; the stock CLIPLoader cannot build a tiny UMT5), ``lynx_adapters``
(the full folder) and ``lynx_adapters_lite`` (a combined file) for LoadLynxAdapters, ``arcface``
(in models/facexlib, found automatically) and ``face_image`` (in the input folder, for LoadImage).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PACK_DIR_NAME = "ComfyUI-Lynx"
START_TIMEOUT_S = float(os.environ.get("LYNX_E2E_START_TIMEOUT", "240"))


class ComfyError(AssertionError):
    """A ComfyUI request or a queued prompt failed; the message carries the server's answer and log tail."""


@dataclass
class ComfyServer:
    url: str
    base_dir: Path
    output_dir: Path
    input_dir: Path
    models_dir: Path
    models: dict[str, str]
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def clip_loader_node(self) -> dict:
        """The API node that loads the tiny UMT5 (stock CLIPLoader cannot: see comfy_support)."""
        return {"class_type": "LynxE2ETinyUMT5Loader", "inputs": {"clip_name": self.models["text_encoder"]}}

    # ---------------------------------------------------------------- HTTP
    def request(self, path: str, data: Any = None, timeout: float = 60.0) -> Any:
        """GET (data None) or POST JSON to ``path``; returns the decoded JSON answer."""
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise ComfyError(f"{path}: HTTP {err.code}: {detail}\n--- server log ---\n{self.log_tail()}") from None
        return json.loads(raw) if raw else None

    def get_bytes(self, path: str, timeout: float = 60.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.read()

    def object_info(self, node_class: str | None = None) -> dict:
        return self.request("/object_info" + (f"/{node_class}" if node_class else ""))

    # ---------------------------------------------------------------- prompts
    def queue(self, prompt: dict) -> str:
        """POST an API-format workflow to /prompt; returns the prompt id (raises with node_errors)."""
        answer = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise ComfyError(f"prompt rejected: {json.dumps(answer['node_errors'], indent=1)}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Poll /history until the prompt finishes; returns its history entry, raises on error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(f"ComfyUI exited (code {self.process.returncode})\n{self.log_tail()}")
            history = self.request(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    messages = json.dumps(status.get("messages", []), indent=1)[-6000:]
                    raise ComfyError(f"prompt {prompt_id} failed: {messages}\n--- server log ---\n{self.log_tail()}")
                return entry
            time.sleep(0.25)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue a prompt and wait for it; returns the history entry (``entry["outputs"]`` per node)."""
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.request("/interrupt", {})

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comfy_path() -> Path | None:
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={raw} is not a ComfyUI checkout (no main.py there)")
    return path


def _python_env(comfy: Path) -> dict[str, str]:
    env = dict(os.environ)
    extra = [str(comfy), str(REPO)]
    if env.get("PYTHONPATH"):
        extra.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(extra)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Keep the server off any GPU the machine may have: the tests run on the CPU by design.
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    return env


def _build_models(python: str, comfy: Path, models_dir: Path, input_dir: Path, log: Path) -> dict[str, str]:
    with open(log, "w") as out:
        proc = subprocess.run([python, str(HERE / "tiny_models.py"), str(models_dir), str(input_dir)],
                              cwd=str(models_dir.parent), env=_python_env(comfy), stdout=subprocess.PIPE,
                              stderr=out, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"building the tiny models failed:\n{log.read_text()[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wait_until_up(server: ComfyServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited during start-up (code {server.process.returncode}):\n{server.log_tail()}")
        try:
            server.request("/system_stats", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, OSError, ComfyError):
            time.sleep(0.5)
    raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    comfy = _comfy_path()
    if comfy is None:
        pytest.skip("COMFYUI_PATH is not set: the ComfyUI end-to-end tests need a ComfyUI checkout")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    base = tmp_path_factory.mktemp("comfy_base")
    custom = base / "custom_nodes"
    models_dir, input_dir, output_dir = base / "models", base / "input", base / "output"
    for d in (custom, models_dir, input_dir, output_dir, base / "temp", base / "user"):
        d.mkdir(parents=True, exist_ok=True)
    (custom / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    (custom / "lynx_e2e_support").symlink_to(HERE / "comfy_support", target_is_directory=True)

    models = _build_models(python, comfy, models_dir, input_dir, base / "build_models.log")

    port = _free_port()
    log_path = base / "comfyui.log"
    cmd = [python, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",
           "--disable-auto-launch", "--preview-method", "latent2rgb"]
    log_file = open(log_path, "w")
    process = subprocess.Popen(cmd, cwd=str(comfy), env=_python_env(comfy), stdout=log_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = ComfyServer(url=f"http://127.0.0.1:{port}", base_dir=base, output_dir=output_dir,
                         input_dir=input_dir, models_dir=models_dir, models=models, log_path=log_path,
                         process=process)
    try:
        _wait_until_up(server, START_TIMEOUT_S)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log_file.close()
        if not os.environ.get("LYNX_E2E_KEEP"):
            shutil.rmtree(base, ignore_errors=True)
