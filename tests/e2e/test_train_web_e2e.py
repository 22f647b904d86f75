"""The training nodes in headless Chromium against a real ComfyUI (CPU, tiny random models).

A tiny training graph is loaded into the page and queued from it like a user's Run; afterwards
Lynx Train Adapters shows its loss plot and Lynx Training Dataset its preview grid on the node,
and the x0 preview (preview_every) reached the page as a progress preview during the run.
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
        const out = {APP}.nodeOutputs[String(n.id)] || {{}};
        return {{id: String(n.id), imgs, images: (out.images || []).map(i => i.filename)}};
    }})()""")


def _shown(state: dict | None) -> bool:
    return bool(state and state["imgs"] and all(i["complete"] and i["w"] > 0 for i in state["imgs"]))


def test_training_run_shows_loss_plot_dataset_preview_and_x0_preview(page, comfy_server, dataset, tmp_path):
    g = train_graph(comfy_server, "e2e_web_train", steps=STEPS)
    g["21"]["inputs"]["preview_every"] = 1
    del g["22"]  # the loss plot shows on the training node itself; no extra PreviewImage
    # every progress preview the page receives: which node it is for and whether it decodes as an image
    page.eval(f"""(() => {{
        window.__lynxPreviews = [];
        {API}.addEventListener('b_preview_with_metadata', ({{detail}}) => {{
            const rec = {{node: String(detail.displayNodeId), type: detail.blob.type, size: detail.blob.size, w: 0}};
            window.__lynxPreviews.push(rec);
            const img = new Image();
            img.onload = () => {{ rec.w = img.naturalWidth; }};
            img.src = URL.createObjectURL(detail.blob);
        }});
    }})()""")
    page.eval(f"{APP}.loadApiJson({json.dumps(g)}, 'lynx_tiny_train')")
    time.sleep(0.5)
    assert _missing_nodes_dialog(page) == ""
    types = page.eval(f"{APP}.graph.nodes.map(n => n.type)")
    assert {"LynxTrainingDataset", "LynxTrainAdapters"} <= set(types), types
    page.eval(f"{APP}.queuePrompt(0, 1)")
    page.wait(f"""(() => {{ {APP}.graph.setDirtyCanvas(true, true);
        const n = {APP}.graph.nodes.find(n => n.type === 'LynxTrainAdapters');
        return !!(n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0)); }})()""",
              300, "the loss plot on Lynx Train Adapters")
    page.wait(f"""(() => {{ {APP}.graph.setDirtyCanvas(true, true);
        const n = {APP}.graph.nodes.find(n => n.type === 'LynxTrainingDataset');
        return !!(n && n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0)); }})()""",
              60, "the preview grid on Lynx Training Dataset")
    time.sleep(0.5)  # one more frame, so the screenshot has both images drawn
    shot = page.screenshot(tmp_path / "lynx_tiny_train_after_run.png")
    assert shot.stat().st_size > 10_000

    train, data = _node_images(page, "LynxTrainAdapters"), _node_images(page, "LynxTrainingDataset")
    assert _shown(train) and train["images"][0].startswith("lynx_loss_plot_"), train
    assert "/view?" in train["imgs"][0]["src"] and "lynx_loss_plot_" in train["imgs"][0]["src"]
    assert _shown(data) and data["images"][0].startswith("lynx_dataset_preview_"), data
    assert "lynx_dataset_preview_" in data["imgs"][0]["src"]
    # the loss plot is wider than tall; the grid is one row of (face | first frame) per pair (two pairs)
    assert train["imgs"][0]["w"] > train["imgs"][0]["h"], train
    assert data["imgs"][0]["h"] >= data["imgs"][0]["w"] * 0.9, data
    # the run really trained STEPS steps
    run = comfy_server.output_dir / "lynx_training" / "e2e_web_train"
    assert len(json.loads((run / "history.json").read_text())["loss"]) == STEPS

    # the x0 previews (preview_every=1) came to the page for the training node, as decodable images
    page.wait("window.__lynxPreviews.filter(p => p.w > 0).length > 0", 10, "a decoded x0 preview")
    previews = page.eval("window.__lynxPreviews")
    ours = [p for p in previews if p["node"] == train["id"]]
    assert ours, previews
    assert all(p["type"] == "image/jpeg" and p["size"] > 0 for p in ours), ours
    assert any(p["w"] > 0 for p in ours), ours
    assert not [c for c in page.console if "lynx" in c.lower()], page.console
