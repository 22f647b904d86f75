"""The front-end in headless Chromium against a real ComfyUI server: our templates load with every
node and widget, and after a run the video preview and the face caption appear.

Needs COMFYUI_PATH (see conftest.py) and Debian's Chromium (`apt-get install -y chromium`, or
LYNX_CHROMIUM=/path/to/chrome); skips without them. Chromium is driven over the DevTools protocol
with websocket-client. LYNX_E2E_SCREENSHOTS=DIR keeps the screenshots.
"""
import base64
import copy
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
PACK = "ComfyUI-Lynx"
OUR_TYPES = ("LoadLynxAdapters", "LynxEncodeFaceID", "LynxEncodeReference", "LynxSampler", "LynxVideoCombine")
TRAIN_TYPES = ("LynxTrainingDataset", "LynxTrainAdapters", "LynxSaveAdapters")
TINY = {"width": 64, "height": 64, "length": 5}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                  "--autoplay-policy=no-user-gesture-required", "--window-size=1600,1000"]
APP = "window.comfyAPI.app.app"


def _chromium() -> str | None:
    for cand in (os.environ.get("LYNX_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).is_file():
            return cand
    return None


class Browser:
    """One headless Chromium page driven over the DevTools protocol."""

    def __init__(self, exe: str) -> None:
        import websocket

        self.user_dir = tempfile.mkdtemp(prefix="lynx_chromium_")
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={self.user_dir}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.user_dir) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{exe} did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], suppress_origin=True, timeout=120)
        self._id = 0
        self.console: list[str] = []
        self.send("Runtime.enable")
        self.send("Page.enable")

    def _event(self, msg: dict) -> None:
        if msg.get("method") == "Runtime.exceptionThrown":
            d = msg["params"]["exceptionDetails"]
            self.console.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
        elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] in ("error", "warning"):
            args = msg["params"]["args"]
            self.console.append(msg["params"]["type"] + ": " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in args))

    def send(self, method: str, **params):
        self._id += 1
        mid = self._id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self._event(msg)

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise AssertionError(f"JS error in {expr[:200]!r}: {d.get('exception', {}).get('description', d)}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expr)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                     + "\n".join(self.console[-20:]))
            time.sleep(0.25)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        keep = os.environ.get("LYNX_E2E_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)
        return path

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close(timeout=2)
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.user_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def page(comfy_server):
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium: `apt-get install -y chromium` (or set LYNX_CHROMIUM)")
    if "UpscaleModelLoader" not in comfy_server.object_info():
        # The 1.27 front-end maps model folders to core loader nodes and throws while building
        # any loader's widgets when one of them is missing (this one needs `spandrel`).
        pytest.skip("ComfyUI's UpscaleModelLoader is missing (install ComfyUI's requirement `spandrel`): "
                    "the front-end cannot build loader nodes without it")
    # A fresh user: skip the first-run template picker; the tiny graphs name real files anyway.
    comfy_server.request("/settings/Comfy.TutorialCompleted", True)
    comfy_server.request("/settings/Comfy.Workflow.ShowMissingModelsWarning", False)
    comfy_server.request("/settings/Comfy.Workflow.ShowMissingNodesWarning", True)
    browser = Browser(exe)
    try:
        browser.send("Page.navigate", url=comfy_server.url + "/")
        browser.wait(f"!!(window.comfyAPI && window.comfyAPI.app && {APP} && {APP}.graph)", 120, "the ComfyUI app")
        browser.wait("!!document.getElementById('lynx-preview-style')", 60, "our extension's setup()")
        yield browser
    finally:
        browser.close()


def _missing_nodes_dialog(page) -> str:
    return page.eval("Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)"
                     ".filter(t => /missing/i.test(t) && /node/i.test(t)).join('\\n')")


def _expected_widgets(object_info: dict, node_type: str) -> list[str]:
    """Widget names in the order the front-end creates them, seeds followed by their control."""
    info = object_info[node_type]
    names = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            t = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if (isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) and not opts.get("forceInput"):
                names.append(name)
                if t == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
                    names.append("control_after_generate")
    return names


def _graph_state(page) -> list[dict]:
    return page.eval(f"""{APP}.graph.nodes.map(n => ({{
        id: n.id, type: n.type, errors: !!n.has_errors,
        registered: !!LiteGraph.registered_node_types[n.type],
        widgets: (n.widgets || []).map(w => w.name),
        values: (n.widgets || []).filter(w => w.serialize !== false).map(w => w.value),
        size: [n.size[0], n.size[1]]
    }}))""")


# UI template (its file name is the card's title) -> its API twin
TEMPLATES = {"Lynx Full (ID and Ref adapters), photo to video": "lynx_full_t2v_api.json",
             "Lynx Lite (ID adapter only), photo to video": "lynx_lite_t2v_api.json",
             "Lynx Train the adapters on a dataset": "lynx_train_api.json",
             "Lynx Train then generate, photo to video": "lynx_train_then_t2v_api.json",
             "Lynx Full (ID and Ref adapters), image to video": "lynx_full_i2v_api.json",
             "Lynx Full (ID and Ref adapters), VACE reference to video": "lynx_full_vace_api.json",
             "Lynx Full (ID and Ref adapters), long video, context windows": "lynx_full_long_context_api.json"}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_template_loads_with_our_nodes_and_widgets(page, comfy_server, tmp_path, name):
    info = comfy_server.object_info()
    # load it the way the template browser does: fetch the served file, then loadGraphData
    page.eval(f"""(async () => {{
        const r = await fetch('api/workflow_templates/{PACK}/' + encodeURIComponent('{name}') + '.json');
        await {APP}.loadGraphData(await r.json(), true, true, '{name}');
    }})()""")
    time.sleep(1.0)
    assert _missing_nodes_dialog(page) == ""
    state = {n["id"]: n for n in _graph_state(page)}
    saved = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert set(state) == {n["id"] for n in saved["nodes"]}
    for node in saved["nodes"]:
        s = state[node["id"]]
        assert s["type"] == node["type"] and s["registered"], s
        assert not s["errors"], f"node {node['id']} ({node['type']}) has errors"
        if node["type"] in OUR_TYPES + TRAIN_TYPES:
            assert s["widgets"] == _expected_widgets(info, node["type"]), node["type"]
        assert s["values"] == node["widgets_values"], f"node {node['id']} ({node['type']}) widget values"
    expected = set(OUR_TYPES) - ({"LynxEncodeReference"} if "Full" not in name else set())
    if "Train" in name:  # the training templates: lite, and the training-only one has no sampler
        expected = ({"LoadLynxAdapters"} if "generate" not in name else expected) | set(TRAIN_TYPES)
    assert {n["type"] for n in saved["nodes"]} >= expected
    # the front-end turns the template into the same API prompt as our API file
    prompt = page.eval(f"{APP}.graphToPrompt().then(p => p.output)")
    api = json.loads((WORKFLOWS / "api" / TEMPLATES[name]).read_text())
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in api.items()}
    shot = page.screenshot(tmp_path / f"{TEMPLATES[name][:-9]}_loaded.png")
    assert shot.stat().st_size > 10_000


def test_template_browser_lists_our_graphs(page, tmp_path):
    # a tall viewport, so that every card of the pack (two rows) is on screen: the cards load lazily
    page.send("Emulation.setDeviceMetricsOverride", width=1600, height=2000, deviceScaleFactor=1, mobile=False)
    try:
        _check_template_browser(page, tmp_path)
    finally:
        page.send("Emulation.clearDeviceMetricsOverride")


def _check_template_browser(page, tmp_path):
    page.eval(f"{APP}.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.wait("(() => { const d = Array.from(document.querySelectorAll('.p-dialog'))"
              f".map(d => d.innerText).find(t => t.includes('{PACK}')); return d || null; }})()",
              30, "our pack in the template browser")
    page.eval(f"""(() => {{
        const item = Array.from(document.querySelectorAll('.p-dialog *'))
            .find(e => e.children.length === 0 && e.textContent.trim() === '{PACK}');
        item && item.click();
    }})()""")
    names = page.wait("(() => { const d = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)"
                      ".find(t => t.includes('Lynx Full')); return d || null; })()", 30, "our templates listed")
    assert "Lynx Lite" in names and "t2v_api" not in names
    # each of our cards shows its thumbnail (a broken image has naturalWidth 0); the cards load their
    # images lazily, so the first one not loaded yet is scrolled into view on every poll
    page.wait("""(() => {
        const ours = Array.from(document.querySelectorAll('.p-dialog img')).filter(img => {
            for (let e = img.parentElement, k = 0; e && k < 8; e = e.parentElement, k++) {
                if (e.querySelectorAll('img').length === 1 && /Lynx (Full|Lite|Train)/.test(e.innerText)) return true;
            }
            return false;
        });
        const loaded = ours.filter(img => img.complete && img.naturalWidth > 0);
        const next = ours.find(img => !(img.complete && img.naturalWidth > 0));
        if (next) next.scrollIntoView({block: 'center'});
        return ours.length >= 4 && loaded.length === ours.length;
    })()""", 30, "the thumbnails of our template cards")
    page.screenshot(tmp_path / "template_browser.png")
    page.send("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    page.send("Input.dispatchKeyEvent", type="keyUp", key="Escape", code="Escape", windowsVirtualKeyCode=27)


def _tiny_ui(models: dict) -> dict:
    g = copy.deepcopy(json.loads((WORKFLOWS / "Lynx Full (ID and Ref adapters), photo to video.json").read_text()))
    for n in g["nodes"]:
        t, v = n["type"], n.get("widgets_values")
        if t == "UNETLoader":
            v[0] = models["diffusion_model"]
        elif t == "VAELoader":
            v[0] = models["vae"]
        elif t == "CLIPLoader":
            # ComfyUI builds UMT5 from a fixed 5.7 B config: the e2e support pack loads the tiny one.
            n["type"] = "LynxE2ETinyUMT5Loader"
            n["widgets_values"] = [models["text_encoder"]]
            n["inputs"] = [{"name": "clip_name", "type": "COMBO", "widget": {"name": "clip_name"}, "link": None}]
            n["properties"] = {"Node name for S&R": "LynxE2ETinyUMT5Loader"}
        elif t == "LoadLynxAdapters":
            v[0] = models["lynx_adapters"]
        elif t == "LoadImage":
            v[0] = models["face_image"]
        elif t == "EmptyHunyuanLatentVideo":
            v[:3] = [TINY["width"], TINY["height"], TINY["length"]]
        elif t == "LynxSampler":
            v[2] = 2  # steps (seed, control, steps, ...)
    return g


def test_run_shows_video_preview_and_face_caption(page, comfy_server, tmp_path):
    page.eval(f"{APP}.loadGraphData({json.dumps(_tiny_ui(comfy_server.models))}, true, true, 'lynx_tiny')")
    time.sleep(0.5)
    assert _missing_nodes_dialog(page) == ""
    before = page.eval(f"JSON.stringify({APP}.graph.serialize().nodes.map(n => [n.id, n.widgets_values]))")
    page.eval(f"{APP}.queuePrompt(0, 1)")
    page.wait("(() => { const v = document.querySelector('.lynx-video-preview video');"
              " return v && v.readyState >= 1 && v.videoWidth > 0; })()", 900,
              "a playable video in the Lynx Video Combine preview")
    video = page.eval("""(() => { const v = document.querySelector('.lynx-video-preview video');
        const r = v.getBoundingClientRect();
        return {src: v.src, w: v.videoWidth, h: v.videoHeight, duration: v.duration,
                file: v.parentElement.dataset.lynxFile, error: v.parentElement.dataset.lynxError || null,
                visible: r.width > 0 && r.height > 0}; })()""")
    page.screenshot(tmp_path / "lynx_tiny_after_run.png")
    assert video["error"] is None
    assert (video["w"], video["h"]) == (TINY["width"], TINY["height"])
    assert video["visible"]
    assert "/view?" in video["src"] and video["file"].endswith(".mp4")
    assert list(comfy_server.output_dir.rglob(video["file"])), "the previewed file is not in the output folder"

    faces = page.eval(f"""(() => {{
        const n = {APP}.graph.nodes.find(n => n.type === 'LynxEncodeFaceID');
        const cap = document.querySelector('.lynx-face-caption');
        return {{caption: cap ? cap.textContent : null, widgets: (n.widgets || []).map(w => w.name),
                 images: (n.imgs || []).length,
                 outputs: Object.keys({APP}.nodeOutputs[String(n.id)] || {{}})}};
    }})()""")
    assert "images" in faces["outputs"], "LynxEncodeFaceID sent no preview images"
    assert faces["caption"] and "lynx_face_caption" in faces["widgets"]
    # the previews are never saved into the workflow
    after = page.eval(f"JSON.stringify({APP}.graph.serialize().nodes.map(n => [n.id, n.widgets_values]))")
    assert after == before
    assert not [c for c in page.console if "lynx" in c.lower()], page.console
