"""The queue tool and the shipped workflows against a real ComfyUI server (tiny random models).

Needs COMFYUI_PATH (see conftest.py); skips without it.
"""
import copy
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from lynx_batch import queue as lq

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
CORE = json.loads((ROOT / "tests" / "core_nodes.json").read_text())
PACK = "ComfyUI-Lynx"  # the folder name the fixture links the repository as
TINY_LATENT = {"width": 64, "height": 64, "length": 5, "batch_size": 1}
TINY_STEPS = 2


def tiny_api(path: Path, models: dict, variant: str) -> dict:
    """The shipped API workflow, pointed at the fixture's tiny models and made small."""
    wf = copy.deepcopy(json.loads(path.read_text()))
    for node in wf.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inputs["unet_name"] = models["diffusion_model"]
        elif ct == "VAELoader":
            inputs["vae_name"] = models["vae"]
        elif ct == "CLIPLoader":
            # ComfyUI builds UMT5 from a fixed 5.7 B config; the test pack loads the tiny one.
            node["class_type"] = "LynxE2ETinyUMT5Loader"
            node["inputs"] = {"clip_name": models["text_encoder"]}
        elif ct == "LoadLynxAdapters":
            inputs["adapters"] = models["lynx_adapters" if variant == "full" else "lynx_adapters_lite"]
        elif ct == "LoadImage":
            inputs["image"] = models["face_image"]
        elif ct == "EmptyHunyuanLatentVideo":
            inputs.update(TINY_LATENT)
        elif ct == "LynxSampler":
            inputs["steps"] = TINY_STEPS
    return wf


def _live_inputs(info: dict) -> dict:
    """name -> (section, type, options) from an /object_info entry."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            t = spec[0]
            opts = None
            if isinstance(t, list):
                t, opts = "COMBO", t
            elif t == "COMBO":
                opts = (spec[1] if len(spec) > 1 else {}).get("options")
            out[name] = (section, t, opts)
    return out


def test_core_node_data_matches_the_server(comfy_server):
    info = comfy_server.object_info()
    for name, d in CORE["nodes"].items():
        assert name in info, f"{name} is not a node of this ComfyUI"
        live = info[name]
        order = [n for section in ("required", "optional") for n in live.get("input_order", {}).get(section, [])]
        assert [i[0] for i in d["inputs"]] == order, f"{name}: input order changed"
        li = _live_inputs(live)
        for iname, itype, section, options in d["inputs"]:
            assert li[iname][:2] == (section, itype), f"{name}.{iname}: {li[iname][:2]} != {(section, itype)}"
            if options:
                assert set(options) <= set(li[iname][2]), f"{name}.{iname}: options changed"
        assert [o[1] for o in d["outputs"]] == live["output"], f"{name}: outputs changed"


@pytest.mark.parametrize("name", ["lynx_full_t2v_api.json", "lynx_lite_t2v_api.json"])
def test_shipped_api_workflows_fit_the_live_registry(comfy_server, name):
    info = comfy_server.object_info()
    wf = json.loads((WORKFLOWS / "api" / name).read_text())
    for nid, node in wf.items():
        ct = node["class_type"]
        assert ct in info, f"node {nid}: {ct} is not registered"
        li = _live_inputs(info[ct])
        for iname, value in node["inputs"].items():
            assert iname in li, f"node {nid} ({ct}): no input {iname}"
            section, itype, options = li[iname]
            # model-file lists depend on the installed files; every other list must hold our value
            if itype == "COMBO" and not isinstance(value, list) and ct not in (
                    "UNETLoader", "CLIPLoader", "VAELoader", "LoadImage") and iname != "adapters":
                assert value in options, f"node {nid} ({ct}).{iname}: {value!r} not in {options}"
        for iname, (section, _, _) in li.items():
            if section == "required":
                assert iname in node["inputs"], f"node {nid} ({ct}): required {iname} missing"


def test_templates_are_served_to_the_template_browser(comfy_server):
    listing = comfy_server.request("/api/workflow_templates")
    names = sorted(listing.get(PACK, []))
    assert names == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert "Lynx Full (ID and Ref adapters), photo to video" in names and not any(n.endswith("_api") for n in names)
    for n in names:
        served = json.loads(comfy_server.get_bytes(f"/api/workflow_templates/{PACK}/{urllib.parse.quote(n)}.json"))
        assert served == json.loads((WORKFLOWS / f"{n}.json").read_text())
        thumb = comfy_server.get_bytes(f"/api/workflow_templates/{PACK}/{urllib.parse.quote(n)}.jpg")
        assert thumb == (WORKFLOWS / f"{n}.jpg").read_bytes()


def _decode(path: Path):
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames


def test_queue_tool_full_batch_with_a_failing_job(comfy_server, tmp_path, capsys):
    from PIL import Image

    wf_path = tmp_path / "tiny_full_api.json"
    wf_path.write_text(json.dumps(tiny_api(WORKFLOWS / "api" / "lynx_full_t2v_api.json", comfy_server.models,
                                           "full")))
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / "astronaut.png").write_bytes((comfy_server.input_dir / comfy_server.models["face_image"]).read_bytes())
    Image.new("RGB", (256, 256), (128, 128, 128)).save(faces / "blank.png")  # no face: must fail
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\nan astronaut smiles at the camera,5\n", encoding="utf-8")
    out = tmp_path / "out"

    code = lq.main(["--server", comfy_server.url, "--workflow", str(wf_path), "--faces", str(faces),
                    "--prompts", str(prompts), "--out", str(out), "--timeout", "900"])
    stdout, stderr = capsys.readouterr()
    assert code == 1, stdout + stderr
    report = {Path(r["face"]).name: r for r in json.loads((out / "report.json").read_text())}
    ok, bad = report["astronaut.png"], report["blank.png"]

    # the failing job names the node and the server's message, and did not stop the batch
    assert bad["status"] == "failed" and bad["outputs"] == []
    assert "LynxEncodeFaceID" in bad["error"], bad["error"]
    assert ok["status"] == "ok", ok["error"]
    (video,) = [Path(p) for p in ok["outputs"]]
    assert video.parent == out and video.suffix == ".mp4" and video.name.startswith("001_astronaut_")
    frames = _decode(video)
    assert len(frames) == TINY_LATENT["length"]
    assert frames[0].shape == (TINY_LATENT["height"], TINY_LATENT["width"], 3)
    # photos went through /upload/image into our subfolder; the job used the row's seed
    assert (comfy_server.input_dir / "lynx_queue" / "astronaut.png").is_file()
    entry = comfy_server.request(f"/history/{ok['prompt_id']}")[ok["prompt_id"]]
    sent = entry["prompt"][2]
    assert sent["11"]["inputs"]["seed"] == sent["10"]["inputs"]["seed"] == 5
    assert sent["5"]["inputs"]["image"] == "lynx_queue/astronaut.png"
    assert "1 ok, 1 failed, 2 jobs" in stdout
    assert "LynxSampler #11" in stderr  # step progress arrived over the websocket


def test_queue_tool_command_line_lite_polling(comfy_server, tmp_path):
    wf_path = tmp_path / "tiny_lite_api.json"
    wf_path.write_text(json.dumps(tiny_api(WORKFLOWS / "api" / "lynx_lite_t2v_api.json", comfy_server.models,
                                           "lite")))
    face = tmp_path / "me.png"
    face.write_bytes((comfy_server.input_dir / comfy_server.models["face_image"]).read_bytes())
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lynx_batch", "queue", "--server", comfy_server.url,
                           "--workflow", str(wf_path), "--faces", str(face), "--prompt", "a person waves",
                           "--out", str(out), "--no-websocket", "--poll-interval", "0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads((out / "report.json").read_text())
    assert row["status"] == "ok"
    (video,) = [Path(p) for p in row["outputs"]]
    assert len(_decode(video)) == TINY_LATENT["length"]
    assert "1 ok, 0 failed, 1 jobs" in proc.stdout
