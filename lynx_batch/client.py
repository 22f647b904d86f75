"""The few ComfyUI HTTP routes and websocket messages the batch tools need (standard library only;
``websocket-client`` is optional and only brings live progress)."""
import json
import logging
import mimetypes
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from .errors import JobError, PromptRejected, QueueError, ServerGone
from .server_errors import format_prompt_error

log = logging.getLogger("lynx.queue")

UPLOAD_SUBFOLDER = "lynx_queue"


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
            raise ServerGone(f"cannot reach the ComfyUI server at {self.base} ({reason}); start ComfyUI or fix "
                             "--server", reason=str(reason)) from None

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
        raise PromptRejected("the server rejected the workflow: " + format_prompt_error(data, workflow), data)

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        status, data = self._json("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        if status == 200 and isinstance(data, dict):
            return data.get(prompt_id)
        return None

    def queue_state(self, client_id: str | None = None) -> tuple[set[str], set[str]]:
        """Prompt ids running now and waiting in the server queue; with ``client_id``, only those
        sent with it (each queue item's extra_data keeps the client_id of its /prompt request)."""
        status, data = self._json("GET", "/queue")
        if status != 200 or not isinstance(data, dict):
            raise ServerGone(f"{self.base}/queue answered HTTP {status}")

        def ids(items: Any) -> set[str]:
            found = set()
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, list) or len(item) < 2:
                    continue
                extra = item[3] if len(item) > 3 and isinstance(item[3], dict) else {}
                if client_id is None or extra.get("client_id") == client_id:
                    found.add(item[1])
            return found

        return ids(data.get("queue_running", [])), ids(data.get("queue_pending", []))

    def interrupt(self, prompt_id: str) -> None:
        """Stop this prompt if it is the one running (ComfyUI ignores the id when it runs another;
        servers older than the targeted interrupt stop whatever runs, so call it only for ours)."""
        self._json("POST", "/interrupt", {"prompt_id": prompt_id})

    def delete_queued(self, prompt_ids: list[str]) -> None:
        """Take these prompts off the waiting queue (a running or finished one is not touched)."""
        if prompt_ids:
            self._json("POST", "/queue", {"delete": list(prompt_ids)})

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
    """The websocket, or None (then the batch follows jobs by polling) with a warning saying why."""
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
