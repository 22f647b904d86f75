"""The training nodes in headless Chromium against a real ComfyUI (CPU, tiny random models).

A tiny training graph is loaded into the page and queued from it like a user's Run; afterwards
Lynx Train Adapters shows its loss plot and Lynx Training Dataset its preview grid on the node,
and, in a second run, the x0 preview (preview_every) reaches the page and shows on the node.
Skips without COMFYUI_PATH or Chromium (see test_web_e2e.py); LYNX_E2E_SCREENSHOTS=DIR keeps the screenshot.
"""
import json
import time

from tests.e2e.test_train_e2e import dataset, train_graph  # noqa: F401  (dataset is a fixture)
from tests.e2e.test_web_e2e import APP, _missing_nodes_dialog, page  # noqa: F401  (page is a fixture)

API = "window.comfyAPI.api.api"
STEPS = 4


def _node_images(page, node_type: str) -> dict:
    """What the page shows on the first node of ``node_type``: its loaded preview images and outputs."""
    return page.eval(f"""(() => {{
        const n = {APP}.graph.nodes.find(n => n.type === '{node_type}');
        if (!n) return null;
        const imgs = (n.imgs || []).map(i => ({{src: i.src, w: i.naturalWidth, h: i.naturalHeight,
                                                 complete: i.complete}}));
        const images = (n.imgs || []).map(i => new URL(i.src).searchParams.get('filename'));
        return {{id: String(n.id), imgs, images}};
    }})()""")


def _shown(state: dict | None) -> bool:
    return bool(state and state["imgs"] and all(i["complete"] and i["w"] > 0 for i in state["imgs"]))


def _listen(page) -> None:
    """Record in the page the progress previews it receives (node, and whether they decode) and the run's end."""
    page.eval(f"""(() => {{
        window.__lynxPreviews = []; window.__lynxDone = false; window.__lynxError = null;
        window.__lynxBlobOnNode = null;
        if (window.__lynxListening) return;
        window.__lynxListening = true;
        {API}.addEventListener('b_preview_with_metadata', ({{detail}}) => {{
            const rec = {{node: String(detail.displayNodeId), type: detail.blob.type, size: detail.blob.size, w: 0}};
            window.__lynxPreviews.push(rec);
            const img = new Image();
            img.onload = () => {{ rec.w = img.naturalWidth; }};
            img.src = URL.createObjectURL(detail.blob);
        }});
        {API}.addEventListener('execution_success', () => {{ window.__lynxDone = true; }});
        {API}.addEventListener('execution_error', ({{detail}}) => {{ window.__lynxDone = true;
            window.__lynxError = JSON.stringify(detail).slice(0, 3000); }});
    }})()""")


def _load_and_run(page, graph: dict, name: str) -> None:
    """Load the API graph into the page, queue it from the page like Run, wait until it is over."""
    _listen(page)
    page.eval(f"{APP}.loadApiJson({json.dumps(graph)}, '{name}')")
    time.sleep(0.5)
    assert _missing_nodes_dialog(page) == ""
    types = page.eval(f"{APP}.graph.nodes.map(n => n.type)")
    assert {"LynxTrainingDataset", "LynxTrainAdapters"} <= set(types), types
    page.eval(f"{APP}.queuePrompt(0, 1)")
    # on the way, note when the training node shows a progress preview (a blob: image on the node)
    page.wait(f"""(() => {{ {APP}.graph.setDirtyCanvas(true, true);
        const n = {APP}.graph.nodes.find(n => n.type === 'LynxTrainAdapters');
        for (const i of (n && n.imgs) || []) if (i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)
            window.__lynxBlobOnNode = [i.naturalWidth, i.naturalHeight];
        return window.__lynxDone; }})()""", 120, f"the end of the run of {name}")
    assert page.eval("window.__lynxError") is None, page.eval("window.__lynxError")


def _wait_image_on(page, node_type: str, prefix: str) -> dict:
    try:
        page.wait(f"""(() => {{ {APP}.graph.setDirtyCanvas(true, true);
            const n = {APP}.graph.nodes.find(n => n.type === '{node_type}');
            const imgs = (n && n.imgs) || [];
            return imgs.length > 0 && imgs.every(i => i.src.includes('{prefix}') && i.complete
                                                     && i.naturalWidth > 0); }})()""",
                  30, f"the {prefix} image on {node_type}")
    except AssertionError as err:
        raise AssertionError(f"{err}\nnode state: {_node_images(page, node_type)}") from None
    return _node_images(page, node_type)


def test_training_run_shows_loss_plot_and_dataset_preview(page, comfy_server, dataset, tmp_path):
    g = train_graph(comfy_server, "e2e_web_train", steps=STEPS)
    g["21"]["inputs"]["preview_every"] = 0
    del g["22"]  # the loss plot shows on the training node itself; no extra PreviewImage
    _load_and_run(page, g, "lynx_tiny_train")
    train = _wait_image_on(page, "LynxTrainAdapters", "lynx_loss_plot_")
    data = _wait_image_on(page, "LynxTrainingDataset", "lynx_dataset_preview_")
    time.sleep(0.5)  # one more frame, so the screenshot has both images drawn
    shot = page.screenshot(tmp_path / "lynx_tiny_train_after_run.png")
    assert shot.stat().st_size > 10_000
    assert "/view?" in train["imgs"][0]["src"] and "type=temp" in train["imgs"][0]["src"]
    # the loss plot is wider than tall; the grid is one row of (face | first frame) per pair (two pairs)
    assert train["imgs"][0]["w"] > train["imgs"][0]["h"], train
    assert data["imgs"][0]["h"] >= data["imgs"][0]["w"] * 0.9, data
    run = comfy_server.output_dir / "lynx_training" / "e2e_web_train"
    assert len(json.loads((run / "history.json").read_text())["loss"]) == STEPS
    assert page.eval("window.__lynxPreviews.length") == 0  # preview_every=0 sends none
    assert not [c for c in page.console if "lynx" in c.lower()], page.console


def test_training_x0_preview_shows_on_the_node_during_the_run(page, comfy_server, dataset, tmp_path):
    g = train_graph(comfy_server, "e2e_web_train_preview", steps=3)
    g["21"]["inputs"]["preview_every"] = 1
    del g["22"]
    _load_and_run(page, g, "lynx_tiny_train_preview")
    train_id = page.eval(f"String({APP}.graph.nodes.find(n => n.type === 'LynxTrainAdapters').id)")
    page.wait("window.__lynxPreviews.filter(p => p.w > 0).length > 0", 10, "a decoded x0 preview")
    previews = page.eval("window.__lynxPreviews")
    ours = [p for p in previews if p["node"] == train_id]
    assert ours, previews
    assert all(p["type"] == "image/jpeg" and p["size"] > 0 for p in ours), ours
    # the front-end drew it on the training node during the run: x0 (left) beside the target (right)
    blob = page.eval("window.__lynxBlobOnNode")
    assert blob and blob[0] == 2 * blob[1], f"no x0 preview image seen on the node during the run: {blob}"
    # After the run the loss plot replaces the last x0 preview (the front-end would keep a node's
    # progress preview until the node runs again; web/lynx_preview.js drops it when the plot arrives).
    _wait_image_on(page, "LynxTrainAdapters", "lynx_loss_plot_")
    page.screenshot(tmp_path / "lynx_tiny_train_x0_preview.png")
