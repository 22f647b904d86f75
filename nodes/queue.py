"""Batch-queue a Lynx API workflow on a running ComfyUI server.

    python -m nodes.queue --server http://127.0.0.1:8188 \\
        --workflow workflows/api/lynx_full_t2v_api.json \\
        --faces photos/ --prompts prompts.csv --out results/

One job per (prompt, face photo) pair: every prompt runs with every photo, unless a CSV row names
its own photo in a ``face`` column. Photos go up through ``/upload/image``, jobs are queued through
``/prompt``, progress comes from the ``/ws`` websocket (or from polling ``/history`` when the
optional ``websocket-client`` package is missing), and the saved files are fetched through
``/view``. A failing job is reported with the server's error message and never stops the batch;
the exit code is non-zero when any job failed.

Only the standard library is needed (plus ``websocket-client`` for live progress), so the file
also runs as a plain script from any folder: ``python custom_nodes/ComfyUI-Lynx/nodes/queue.py ...``
(``python -m nodes.queue`` only works from the pack's own folder: in ComfyUI's folder ``nodes``
is ComfyUI's own module).
"""
if __name__ == "__main__" and not __package__:
    # As a script, this file's folder comes first on sys.path, and its siblings (and this very
    # file, named like the standard `queue` module) would shadow standard-library modules.
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]

import argparse
import copy
import csv
import json
import logging
import mimetypes
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

log = logging.getLogger("lynx.queue")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# Our node types whose inputs lead to the face photo and to the prompts.
FACE_ENCODERS = ("LynxEncodeFaceID",)
SAMPLERS = ("LynxSampler", "LynxGuider")
TEXT_ENCODERS = ("CLIPTextEncode",)
UPLOAD_SUBFOLDER = "lynx_queue"
LOST_AFTER_S = 30.0


class QueueError(RuntimeError):
    """A problem the user has to fix before the batch can run (bad file, unreachable server...)."""


class JobError(RuntimeError):
    """A problem with one job; the batch goes on."""


# --------------------------------------------------------------------------------------------
# Inputs: prompts, photos, jobs


@dataclass
class Job:
    index: int
    prompt: str
    negative: str | None = None
    seed: int | None = None
    face: Path | None = None

    @property
    def label(self) -> str:
        face = self.face.stem if self.face else "noface"
        return f"{self.index:03d}_{_slug(face, 24)}"


@dataclass
class JobResult:
    job: Job
    status: str = "pending"  # pending | queued | running | ok | failed
    prompt_id: str | None = None
    error: str | None = None
    outputs: list[Path] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    interrupt_sent: bool = False

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


def _slug(text: str, limit: int) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return (s[:limit] or "x").rstrip("-.")


def load_prompts(path: Path) -> list[dict[str, Any]]:
    """Read prompts from a ``.csv`` (columns prompt[,negative,seed,face]) or a text file (one per line).

    Text files skip blank lines and lines starting with ``#``. In a CSV the ``face`` column is a
    path (absolute, or relative to the CSV file) or a file name inside the ``--faces`` folder.
    """
    if not path.is_file():
        raise QueueError(f"--prompts: {path} does not exist; give a .txt file (one prompt per line) or a .csv file")
    text = path.read_text(encoding="utf-8-sig")
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "prompt" not in fields:
            raise QueueError(f"--prompts: {path} has no 'prompt' column; the first line must be a header such as "
                             "'prompt,negative,seed,face'")
        unknown = set(fields) - {"prompt", "negative", "seed", "face"}
        if unknown:
            log.warning("--prompts: ignoring unknown CSV columns %s", sorted(unknown))
        for line_no, raw in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get("prompt"):
                continue
            entry: dict[str, Any] = {"prompt": row["prompt"], "line": line_no}
            if row.get("negative"):
                entry["negative"] = row["negative"]
            if row.get("seed"):
                try:
                    entry["seed"] = int(row["seed"])
                except ValueError:
                    raise QueueError(f"--prompts: {path} line {line_no}: seed {row['seed']!r} is not an integer") from None
            if row.get("face"):
                entry["face"] = row["face"]
            rows.append(entry)
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append({"prompt": line, "line": line_no})
    if not rows:
        raise QueueError(f"--prompts: {path} contains no prompt")
    return rows


def find_faces(path: Path | None) -> list[Path]:
    """Photos given by ``--faces``: one image file, or every image in a folder (sorted, not recursive)."""
    if path is None:
        return []
    if path.is_file():
        return [path]
    if path.is_dir():
        photos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not photos:
            raise QueueError(f"--faces: the folder {path} has no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return photos
    raise QueueError(f"--faces: {path} does not exist; give a photo or a folder of photos")


def make_jobs(prompts: list[dict[str, Any]], faces: list[Path], prompts_file: Path | None = None,
              faces_arg: Path | None = None, seed: int | None = None) -> list[Job]:
    """Pair prompts with photos: a row's own ``face`` wins, otherwise every photo runs every prompt."""
    jobs: list[Job] = []
    for row in prompts:
        if row.get("face"):
            photos = [_resolve_face(row["face"], prompts_file, faces_arg, row.get("line"))]
        elif faces:
            photos = list(faces)
        else:
            photos = [None]
        for photo in photos:
            jobs.append(Job(index=len(jobs) + 1, prompt=row["prompt"], negative=row.get("negative"),
                            seed=row.get("seed", seed), face=photo))
    return jobs


def _resolve_face(value: str, prompts_file: Path | None, faces_arg: Path | None, line: int | None) -> Path:
    candidates = [Path(value).expanduser()]
    if prompts_file is not None:
        candidates.append(prompts_file.parent / value)
    if faces_arg is not None:
        candidates.append((faces_arg if faces_arg.is_dir() else faces_arg.parent) / value)
    for c in candidates:
        if c.is_file():
            return c
    raise QueueError(f"--prompts line {line}: face photo {value!r} not found (looked at "
                     f"{', '.join(str(c) for c in candidates)})")


# --------------------------------------------------------------------------------------------
# The workflow: where the photo, the prompts and the seed go


@dataclass
class Targets:
    face_node: str | None
    prompt_node: str
    negative_node: str | None
    seed_inputs: list[tuple[str, str]]


def load_workflow(path: Path) -> dict[str, Any]:
    """Load an API-format workflow (the file written by ComfyUI's *Export (API)*)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QueueError(f"--workflow: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise QueueError(f"--workflow: {path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]  # a saved /prompt request body
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise QueueError(f"--workflow: {path} is a UI-format workflow; export it in API format "
                         "(ComfyUI menu Workflow > Export (API)) or use the files in workflows/api/")
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise QueueError(f"--workflow: {path} is not an API-format workflow "
                         "(expected {{node_id: {{class_type, inputs}}}})")
    return data


def _link_source(workflow: dict[str, Any], node_id: str, input_name: str) -> str | None:
    value = workflow[node_id].get("inputs", {}).get(input_name)
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in workflow:
        return str(value[0])
    return None


def _by_title(workflow: dict[str, Any], class_types: Iterable[str], words: Iterable[str]) -> list[str]:
    words = [w.lower() for w in words]
    found = []
    for nid, node in workflow.items():
        title = str(node.get("_meta", {}).get("title", "")).lower()
        if node.get("class_type") in class_types and any(w in title for w in words):
            found.append(nid)
    return found


def _check_node(workflow: dict[str, Any], node_id: str, flag: str, input_name: str) -> str:
    node_id = str(node_id)
    if node_id not in workflow:
        raise QueueError(f"{flag}: node {node_id} is not in the workflow (ids: {', '.join(sorted(workflow, key=_nid_key))})")
    if input_name not in workflow[node_id].get("inputs", {}):
        raise QueueError(f"{flag}: node {node_id} ({workflow[node_id].get('class_type')}) has no '{input_name}' input")
    return node_id


def _nid_key(nid: str) -> tuple[int, str]:
    return (int(nid), "") if nid.isdigit() else (1 << 30, nid)


def locate_targets(workflow: dict[str, Any], face_node: str | None = None, prompt_node: str | None = None,
                   negative_node: str | None = None, need_face: bool = True) -> Targets:
    """Find the LoadImage node of the face photo and the text nodes of the prompts.

    Order of preference: the explicit override, then the graph (the LoadImage that feeds
    LynxEncodeFaceID.image; the CLIPTextEncode nodes that feed LynxSampler/LynxGuider positive and
    negative), then node titles ("face", "positive", "negative").
    """
    samplers = sorted((nid for nid, n in workflow.items() if n.get("class_type") in SAMPLERS), key=_nid_key)

    if face_node is not None:
        face = _check_node(workflow, face_node, "--face-node", "image")
    else:
        face_candidates = []
        for nid, n in workflow.items():
            if n.get("class_type") in FACE_ENCODERS:
                src = _link_source(workflow, nid, "image")
                if src and workflow[src].get("class_type") == "LoadImage":
                    face_candidates.append(src)
        face_candidates = sorted(set(face_candidates), key=_nid_key)
        if not face_candidates:
            face_candidates = _by_title(workflow, ("LoadImage",), ("face",))
        if not face_candidates:
            loaders = [nid for nid, n in workflow.items() if n.get("class_type") == "LoadImage"]
            face_candidates = loaders if len(loaders) == 1 else []
        if len(face_candidates) > 1:
            raise QueueError(f"several LoadImage nodes feed a face encoder ({', '.join(face_candidates)}); "
                             "choose one with --face-node ID")
        face = face_candidates[0] if face_candidates else None
        if face is None and need_face:
            raise QueueError("no LoadImage node for the face photo was found; add one that feeds LynxEncodeFaceID, "
                             "or name it with --face-node ID")

    def text_node(override: str | None, flag: str, sampler_input: str, words: tuple[str, ...]) -> str | None:
        if override is not None:
            return _check_node(workflow, override, flag, "text")
        found = []
        for s in samplers:
            src = _link_source(workflow, s, sampler_input)
            if src and workflow[src].get("class_type") in TEXT_ENCODERS:
                found.append(src)
        found = sorted(set(found), key=_nid_key)
        if not found:
            found = _by_title(workflow, TEXT_ENCODERS, words)
        if not found and sampler_input == "positive":
            # A lone text node that is not called negative is the prompt.
            negatives = set(_by_title(workflow, TEXT_ENCODERS, ("negative",)))
            rest = [nid for nid, n in workflow.items() if n.get("class_type") in TEXT_ENCODERS and nid not in negatives]
            found = rest if len(rest) == 1 else []
        if len(found) > 1:
            raise QueueError(f"several {sampler_input} prompt nodes ({', '.join(found)}); choose one with {flag} ID")
        if found and not isinstance(workflow[found[0]]["inputs"].get("text"), str):
            raise QueueError(f"the {sampler_input} prompt node {found[0]} gets its text from a link; "
                             f"choose a node with a text box with {flag} ID")
        return found[0] if found else None

    prompt = text_node(prompt_node, "--prompt-node", "positive", ("positive",))
    if prompt is None:
        raise QueueError("no prompt node was found; connect a CLIPTextEncode to LynxSampler.positive, "
                         "or name it with --prompt-node ID")
    negative = text_node(negative_node, "--negative-node", "negative", ("negative",))
    if negative == prompt:
        negative = None

    seeds = []
    for nid, n in workflow.items():
        for name in ("seed", "noise_seed"):
            if isinstance(n.get("inputs", {}).get(name), int) and not isinstance(n["inputs"][name], bool):
                seeds.append((nid, name))
    return Targets(face_node=face, prompt_node=prompt, negative_node=negative, seed_inputs=sorted(seeds))


def apply_job(workflow: dict[str, Any], targets: Targets, job: Job, face_value: str | None) -> dict[str, Any]:
    """A copy of the workflow with this job's photo, prompts and seed filled in."""
    wf = copy.deepcopy(workflow)
    if face_value is not None and targets.face_node is not None:
        wf[targets.face_node]["inputs"]["image"] = face_value
    wf[targets.prompt_node]["inputs"]["text"] = job.prompt
    if job.negative is not None:
        if targets.negative_node is None:
            raise JobError("the CSV gives a negative prompt but the workflow has no negative prompt node "
                           "(name it with --negative-node ID)")
        wf[targets.negative_node]["inputs"]["text"] = job.negative
    if job.seed is not None:
        # Every literal seed gets the job seed: LynxEncodeReference must share LynxSampler's seed.
        for nid, name in targets.seed_inputs:
            wf[nid]["inputs"][name] = job.seed
    return wf


# --------------------------------------------------------------------------------------------
# The server


class ComfyClient:
    """The few ComfyUI HTTP routes the queue needs, over urllib."""

    def __init__(self, server: str, timeout: float = 60.0) -> None:
        if "://" not in server:
            server = "http://" + server
        self.base = server.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise QueueError(f"cannot reach the ComfyUI server at {self.base} ({reason}); start ComfyUI or fix "
                             "--server") from None

    def _json(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = self._request(method, path, body, {"Content-Type": "application/json"} if body else None)
        try:
            return status, json.loads(data) if data else None
        except json.JSONDecodeError:
            return status, data.decode("utf-8", "replace")

    def check(self) -> dict[str, Any]:
        status, data = self._json("GET", "/system_stats")
        if status != 200 or not isinstance(data, dict):
            raise QueueError(f"{self.base} does not look like a ComfyUI server (/system_stats answered {status})")
        return data

    def upload_image(self, path: Path, subfolder: str = UPLOAD_SUBFOLDER) -> str:
        """Upload a photo to the input folder; returns the value a LoadImage node takes."""
        try:
            content = path.read_bytes()
        except OSError as e:
            raise JobError(f"cannot read the face photo {path}: {e}") from None
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = []
        for name, value in (("type", "input"), ("subfolder", subfolder), ("overwrite", "false")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        fname = path.name.replace('"', "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{fname}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        status, data = self._request("POST", "/upload/image", b"".join(parts),
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise JobError(f"uploading {path} failed (HTTP {status}: {data[:200].decode('utf-8', 'replace')})")
        info = json.loads(data)
        # The server may rename the file to avoid a clash; the answer has the name to use.
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue_prompt(self, workflow: dict[str, Any], client_id: str) -> str:
        status, data = self._json("POST", "/prompt", {"prompt": workflow, "client_id": client_id})
        if status == 200 and isinstance(data, dict) and "prompt_id" in data:
            return data["prompt_id"]
        raise JobError("the server rejected the workflow: " + format_prompt_error(data, workflow))

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        status, data = self._json("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        if status == 200 and isinstance(data, dict):
            return data.get(prompt_id)
        return None

    def queue_state(self) -> tuple[set[str], set[str]]:
        """Prompt ids running now and waiting in the server queue."""
        status, data = self._json("GET", "/queue")
        if status != 200 or not isinstance(data, dict):
            raise QueueError(f"/queue answered HTTP {status}")
        ids = lambda items: {item[1] for item in items if isinstance(item, list) and len(item) > 1}  # noqa: E731
        return ids(data.get("queue_running", [])), ids(data.get("queue_pending", []))

    def interrupt(self, prompt_id: str) -> None:
        self._json("POST", "/interrupt", {"prompt_id": prompt_id})

    def delete_queued(self, prompt_ids: list[str]) -> None:
        if prompt_ids:
            self._json("POST", "/queue", {"delete": prompt_ids})

    def view(self, info: dict[str, Any]) -> bytes:
        query = urllib.parse.urlencode({"filename": info["filename"], "subfolder": info.get("subfolder", ""),
                                        "type": info.get("type", "output")})
        status, data = self._request("GET", "/view?" + query)
        if status != 200:
            raise JobError(f"downloading {info['filename']} failed (HTTP {status})")
        return data

    def ws_url(self, client_id: str) -> str:
        parts = urllib.parse.urlsplit(self.base)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + "/ws", f"clientId={client_id}", ""))


def format_prompt_error(data: Any, workflow: dict[str, Any]) -> str:
    """Make the /prompt 400 answer ({error, node_errors}) readable."""
    if not isinstance(data, dict):
        return str(data)[:500]
    err = data.get("error")
    msg = err.get("message", "") if isinstance(err, dict) else str(err or "")
    if isinstance(err, dict) and err.get("details"):
        msg += f" ({err['details']})"
    details = []
    for nid, ne in (data.get("node_errors") or {}).items():
        ctype = ne.get("class_type") or workflow.get(nid, {}).get("class_type", "?")
        for e in ne.get("errors", []):
            text = e.get("message", "")
            if e.get("details"):
                text += f": {e['details']}"
            details.append(f"node {nid} ({ctype}): {text}")
    return "; ".join([m for m in [msg.strip()] if m] + details) or json.dumps(data)[:500]


def format_execution_error(data: dict[str, Any]) -> str:
    where = f"{data.get('node_type', '?')} (node {data.get('node_id', '?')})"
    etype = data.get("exception_type", "")
    emsg = str(data.get("exception_message", "")).strip()
    return f"{where}: {etype + ': ' if etype else ''}{emsg}"


def output_files(entry: dict[str, Any], include_temp: bool = False) -> list[dict[str, Any]]:
    """Files listed in a /history entry's ui outputs (images, videos, gifs, audio...)."""
    files = []
    for node_id in sorted(entry.get("outputs", {}), key=_nid_key):
        for key, items in entry["outputs"][node_id].items():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    kind = item.get("type", "output")
                    if kind == "output" or include_temp:
                        files.append({**item, "node": node_id, "key": key})
    return files


def history_error(entry: dict[str, Any]) -> str | None:
    """The failure recorded in a /history entry's status messages, if the run failed."""
    status = entry.get("status") or {}
    for event, data in status.get("messages", []) or []:
        if event == "execution_error":
            return format_execution_error(data)
        if event == "execution_interrupted":
            return f"interrupted at {data.get('node_type', '?')} (node {data.get('node_id', '?')})"
    if status.get("status_str") == "error":
        return "the server reports an error but gave no message"
    return None


def unique_path(folder: Path, name: str) -> Path:
    """A path in folder that does not exist yet: name, then 'stem (1).ext', 'stem (2).ext'..."""
    path = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 1
    while path.exists():
        path = folder / f"{stem} ({n}){suffix}"
        n += 1
    return path


# --------------------------------------------------------------------------------------------
# Events


class EventSource:
    """ComfyUI's websocket messages as dicts; ``recv`` returns None when nothing came in time."""

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        import websocket  # optional dependency (websocket-client)

        self._ws = websocket.create_connection(url, timeout=connect_timeout, suppress_origin=True)
        self._timeout_error = websocket.WebSocketTimeoutException

    def recv(self, timeout: float) -> dict[str, Any] | None:
        self._ws.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._ws.recv()
            except self._timeout_error:
                return None
            if isinstance(msg, str):
                try:
                    data = json.loads(msg)
                except json.JSONDecodeError:
                    data = None
                if isinstance(data, dict) and "type" in data:
                    return data
            # Binary frames are latent previews: skip them.
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._ws.settimeout(left)

    def close(self) -> None:
        try:
            self._ws.close(timeout=2)
        except Exception:  # closing a dead socket must not hide the batch result
            pass


def open_events(client: ComfyClient, client_id: str, enabled: bool = True) -> EventSource | None:
    if not enabled:
        return None
    try:
        import websocket  # noqa: F401  (only whether it is there)
    except ImportError:
        log.warning("websocket-client is not installed: following jobs by polling /history "
                    "(no step progress). `pip install websocket-client` for live progress.")
        return None
    try:
        return EventSource(client.ws_url(client_id))
    except Exception as e:  # any connect failure: polling still works
        log.warning("websocket %s failed (%s): following jobs by polling /history", client.ws_url(client_id), e)
        return None


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


# --------------------------------------------------------------------------------------------
# The batch


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


def run_batch(client: ComfyClient, workflow: dict[str, Any], jobs: list[Job], opts: BatchOptions,
              stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic) -> list[JobResult]:
    """Upload, queue and follow every job; never raises for a single job's failure."""
    targets = locate_targets(workflow, opts.face_node, opts.prompt_node, opts.negative_node,
                             need_face=any(j.face for j in jobs))
    if targets.face_node is None and any(j.face for j in jobs):
        raise QueueError("photos were given but the workflow has no face LoadImage node (--face-node ID)")
    if targets.face_node is not None and not any(j.face for j in jobs):
        log.warning("no --faces given: node %s keeps its image %r", targets.face_node,
                    workflow[targets.face_node]["inputs"].get("image"))
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    client_id = uuid.uuid4().hex
    progress = Progress(stream, len(jobs))
    results = [JobResult(job) for job in jobs]
    by_prompt: dict[str, JobResult] = {}
    uploaded: dict[Path, str] = {}

    events = open_events(client, client_id, opts.use_websocket)
    try:
        # Queue everything first so the server never idles between jobs.
        for r in results:
            try:
                face_value = None
                if r.job.face is not None:
                    key = r.job.face.resolve()
                    if key not in uploaded:
                        uploaded[key] = client.upload_image(r.job.face)
                    face_value = uploaded[key]
                wf = apply_job(workflow, targets, r.job, face_value)
                r.prompt_id = client.queue_prompt(wf, client_id)
                r.status = "queued"
                by_prompt[r.prompt_id] = r
                progress.line(f"[{r.job.index}/{len(jobs)}] queued {r.prompt_id} ({_describe(r.job)})")
            except JobError as e:
                _fail(r, str(e), clock, progress)
        _follow(client, events, by_prompt, workflow, opts, progress, clock)
    except KeyboardInterrupt:
        waiting = [pid for pid, r in by_prompt.items() if r.status == "queued"]
        try:
            client.delete_queued(waiting)
        except QueueError as e:
            log.warning("could not remove the waiting jobs from the server queue: %s", e)
        for r in results:
            if r.status in ("pending", "queued", "running"):
                _fail(r, "cancelled by the user (Ctrl-C)", clock, progress)
        progress.line(f"cancelled: removed {len(waiting)} waiting job(s) from the server queue")
    finally:
        if events is not None:
            events.close()
    return results


def _describe(job: Job) -> str:
    face = job.face.name if job.face else "-"
    text = job.prompt if len(job.prompt) <= 50 else job.prompt[:47] + "..."
    return f"face {face}, seed {job.seed if job.seed is not None else 'as in workflow'}, {text!r}"


def _fail(r: JobResult, message: str, clock: Callable[[], float], progress: Progress) -> None:
    r.status = "failed"
    r.error = message
    r.finished = clock()
    progress.line(f"[{r.job.index}/{progress.total}] FAILED: {message}")


def _follow(client: ComfyClient, events: EventSource | None, by_prompt: dict[str, JobResult],
            workflow: dict[str, Any], opts: BatchOptions, progress: Progress,
            clock: Callable[[], float]) -> None:
    pending = {pid for pid, r in by_prompt.items() if r.status in ("queued", "running")}
    errors: dict[str, str] = {}
    ended: set[str] = set()  # the server said the job ended; its /history entry may lag a little
    missing: dict[str, float] = {}
    last_poll = clock()
    # With a websocket, polling is only a safety net for missed messages.
    poll_every = opts.poll_interval if events is None else max(10.0, opts.poll_interval)

    def node_name(node_id: Any) -> str:
        ctype = workflow.get(str(node_id), {}).get("class_type")
        return f"{ctype} #{node_id}" if ctype else f"node {node_id}"

    def finish(pid: str, entry: dict[str, Any] | None) -> None:
        if entry is None:
            first = missing.setdefault(pid, clock())
            if clock() - first > LOST_AFTER_S:
                pending.discard(pid)
                _fail(by_prompt[pid], "the job left the server queue without a /history entry "
                      "(was the server restarted?)", clock, progress)
            else:
                ended.add(pid)
            return
        pending.discard(pid)
        r = by_prompt[pid]
        r.finished = clock()
        if r.started is None:
            r.started = r.finished
        error = errors.get(pid) or history_error(entry)
        if error and r.interrupt_sent:
            error = f"timed out after {opts.timeout:g} s ({error})"
        try:
            r.outputs = _download(client, entry, r.job, opts)
        except (JobError, QueueError, OSError) as e:
            error = error or str(e)
        if error:
            _fail(r, error, clock, progress)
        else:
            r.status = "ok"
            files = ", ".join(p.name for p in r.outputs) or "no output files"
            progress.line(f"[{r.job.index}/{progress.total}] done in {r.seconds:.1f} s: {files}")

    def started(r: JobResult, when: float) -> None:
        if r.started is None:
            r.status, r.started = "running", when
            progress.line(f"[{r.job.index}/{progress.total}] running {r.prompt_id}")

    # Short waits when a timeout has to be noticed in time.
    wait = max(0.05, min(1.0, opts.timeout / 4)) if opts.timeout else 1.0
    while pending:
        msg = None
        if events is not None:
            try:
                msg = events.recv(timeout=wait)
            except Exception as e:  # the socket died: carry on by polling
                log.warning("websocket closed (%s): following the remaining jobs by polling /history", e)
                events.close()
                events = None
                poll_every = opts.poll_interval
        else:
            time.sleep(opts.poll_interval)

        if msg is not None:
            data = msg.get("data") or {}
            pid = data.get("prompt_id")
            kind = msg.get("type")
            if pid in pending:
                r = by_prompt[pid]
                if kind == "execution_start":
                    started(r, clock())
                elif kind == "executing" and data.get("node") is None:
                    finish(pid, client.history(pid))
                elif kind == "progress":
                    started(r, clock())
                    progress.step(r, node_name(data.get("node")), int(data.get("value", 0)),
                                  int(data.get("max", 0)))
                elif kind == "execution_error":
                    errors[pid] = format_execution_error(data)
                elif kind == "execution_interrupted":
                    errors[pid] = f"interrupted at {node_name(data.get('node_id'))}"

        now = clock()
        if events is None or ended or now - last_poll >= poll_every:
            last_poll = now
            ended.clear()
            running, waiting = client.queue_state()
            for pid in sorted(pending):
                if pid in running:
                    started(by_prompt[pid], now)
                elif pid not in waiting:  # off the queue: its /history entry is written
                    finish(pid, client.history(pid))
        if opts.timeout:
            for pid in sorted(pending):
                r = by_prompt[pid]
                if r.started is not None and not r.interrupt_sent and now - r.started > opts.timeout:
                    r.interrupt_sent = True
                    progress.line(f"[{r.job.index}/{progress.total}] over {opts.timeout:g} s: interrupting")
                    client.interrupt(pid)


def _download(client: ComfyClient, entry: dict[str, Any], job: Job, opts: BatchOptions) -> list[Path]:
    saved = []
    for info in output_files(entry, opts.include_temp):
        data = client.view(info)
        path = unique_path(opts.out_dir, f"{job.label}_{Path(info['filename']).name}")
        path.write_bytes(data)
        saved.append(path)
    return saved


# --------------------------------------------------------------------------------------------
# Report


def format_summary(results: list[JobResult]) -> str:
    """A plain-text table: one row per job, then the totals."""
    rows = [("#", "status", "face", "seed", "time", "result")]
    for r in results:
        face = r.job.face.name if r.job.face else "-"
        secs = f"{r.seconds:.1f}s" if r.seconds is not None and r.status == "ok" else ""
        what = ", ".join(p.name for p in r.outputs) if r.status == "ok" else (r.error or "")
        rows.append((str(r.job.index), r.status, face, "" if r.job.seed is None else str(r.job.seed), secs,
                     what.replace("\n", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5] for row in rows]
    ok = sum(r.status == "ok" for r in results)
    lines.append(f"{ok} ok, {len(results) - ok} failed, {len(results)} jobs")
    return "\n".join(lines)


def write_report(results: list[JobResult], path: Path) -> None:
    report = [{
        "index": r.job.index, "status": r.status, "prompt": r.job.prompt, "negative": r.job.negative,
        "seed": r.job.seed, "face": str(r.job.face) if r.job.face else None, "prompt_id": r.prompt_id,
        "error": r.error, "outputs": [str(p) for p in r.outputs],
        "seconds": None if r.seconds is None else round(r.seconds, 3),
    } for r in results]
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nodes.queue",
        description="Queue a Lynx API workflow on a ComfyUI server for many face photos and prompts.")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    p.add_argument("--workflow", required=True, type=Path, help="API-format workflow JSON (workflows/api/...)")
    p.add_argument("--faces", type=Path, help="a face photo, or a folder of photos (each prompt runs with each photo)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="a .txt file (one prompt per line) or a .csv "
                     "(columns prompt[,negative,seed,face])")
    src.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    p.add_argument("--negative", help="negative prompt for rows that have none (default: the workflow's)")
    p.add_argument("--seed", type=int, help="seed for rows that have none (default: the workflow's)")
    p.add_argument("--out", type=Path, default=Path("lynx_results"), help="folder for the downloaded files "
                   "and report.json (default %(default)s); existing files are never overwritten")
    p.add_argument("--face-node", help="id of the LoadImage node that takes the photo")
    p.add_argument("--prompt-node", help="id of the positive CLIPTextEncode node")
    p.add_argument("--negative-node", help="id of the negative CLIPTextEncode node")
    p.add_argument("--timeout", type=float, default=0.0, help="interrupt a job that runs longer than this many "
                   "seconds (default: no limit)")
    p.add_argument("--include-temp", action="store_true", help="also download previews (temp files)")
    p.add_argument("--no-websocket", action="store_true", help="follow jobs by polling /history only")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between /history polls (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="only the summary")
    return p


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Exit codes: 0 all jobs ok, 1 some job failed, 2 the batch could not start."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = build_parser().parse_args(argv)
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
        client = ComfyClient(args.server)
        client.check()
        opts = BatchOptions(out_dir=args.out, include_temp=args.include_temp, timeout=args.timeout,
                            poll_interval=args.poll_interval, use_websocket=not args.no_websocket,
                            face_node=args.face_node, prompt_node=args.prompt_node,
                            negative_node=args.negative_node)
        progress_stream = _NullStream() if args.quiet else stderr
        results = run_batch(client, workflow, jobs, opts, stream=progress_stream)
    except QueueError as e:
        stderr.write(f"error: {e}\n")
        return 2
    write_report(results, args.out / "report.json")
    stdout.write(format_summary(results) + "\n")
    stdout.write(f"report: {args.out / 'report.json'}\n")
    return 0 if all(r.status == "ok" for r in results) else 1


class _NullStream:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


if __name__ == "__main__":
    sys.exit(main())
