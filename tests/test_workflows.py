"""The shipped workflows: valid graphs of known nodes, UI and API files in step, official defaults.

Runs without ComfyUI. Our node schemas come from the package's NODE_CLASS_MAPPINGS (their
INPUT_TYPES, RETURN_TYPES, RETURN_NAMES); core node schemas from tests/core_nodes.json.
"""
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
CORE = json.loads((Path(__file__).parent / "core_nodes.json").read_text())

OFFICIAL_NEGATIVE = (
    "Bright tones, overexposed, blurred background, static, subtitles, style, works, paintings, images, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards")
OUR_PREFIXES = ("Lynx", "LoadLynx")
SEED_NAMES = ("seed", "noise_seed")  # the front-end adds a control_after_generate widget after these
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# -- schemas -----------------------------------------------------------------------------------


class Input:
    def __init__(self, name, type_, section, options=None, meta=None):
        self.name, self.type, self.section = name, type_, section
        self.options = options  # allowed values of a COMBO, when known
        self.meta = meta or {}

    @property
    def is_widget(self):
        return self.type in WIDGET_TYPES and not self.meta.get("forceInput")


class Schema:
    def __init__(self, inputs, outputs, image_upload=False):
        self.inputs = inputs
        self.outputs = outputs  # [(name, type)]
        self.image_upload = image_upload

    def input(self, name):
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self):
        return [i for i in self.inputs if i.is_widget]

    @property
    def sockets(self):
        return [i for i in self.inputs if not i.is_widget]

    def ui_widget_values(self, api_values):
        """The widgets_values list the front-end writes for these widget values."""
        out = []
        for w in self.widgets:
            out.append(api_values[w.name])
            if w.type == "INT" and (w.name in SEED_NAMES or w.meta.get("control_after_generate")):
                out.append(_CONTROL)
            if self.image_upload and w.name == "image":
                out.append("image")
        return out


class _Control:
    """Placeholder for the UI-only control_after_generate value."""

    def __eq__(self, other):
        return other in ("fixed", "increment", "decrement", "randomize")

    def __repr__(self):
        return "<control_after_generate>"


_CONTROL = _Control()


def _schema_from_class(cls):
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            type_, meta = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            options = None
            if isinstance(type_, (list, tuple)):
                options, type_ = list(type_), "COMBO"
            elif type_ == "COMBO":
                options = list(meta.get("options", [])) or None
            inputs.append(Input(name, type_, section, options, meta))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return Schema(inputs, list(zip(names, cls.RETURN_TYPES)))


@pytest.fixture(scope="module")
def schemas():
    """Node type -> Schema for our nodes (from the registry) and the core nodes (from the data file)."""
    from nodes import NODE_CLASS_MAPPINGS

    ours = {name: _schema_from_class(cls) for name, cls in NODE_CLASS_MAPPINGS.items()}
    assert not set(ours) & set(CORE["nodes"]), "our node names must not collide with core ones"
    out = dict(ours)
    for name, d in CORE["nodes"].items():
        out[name] = Schema([Input(n, t, s, o) for n, t, s, o in d["inputs"]], [tuple(o) for o in d["outputs"]],
                           image_upload=bool(d.get("image_upload")))
    return out


# -- files -------------------------------------------------------------------------------------


def _all_json():
    return sorted(WORKFLOWS.rglob("*.json"))


def _is_ui(data):
    return isinstance(data, dict) and "nodes" in data and "links" in data


UI_FILES = [p for p in _all_json() if _is_ui(json.loads(p.read_text(encoding="utf-8")))]
API_FILES = [p for p in _all_json() if p not in UI_FILES]


# Template file names are what ComfyUI's template browser shows as the card's title and description
# for a custom node pack (it has no other source), so they are written as titles; the API twins keep
# short names for scripts.
TEMPLATES = {
    "Lynx Full (ID and Ref adapters), photo to video.json": "lynx_full_t2v_api.json",
    "Lynx Lite (ID adapter only), photo to video.json": "lynx_lite_t2v_api.json",
    "Lynx Train the adapters on a dataset.json": "lynx_train_api.json",
    "Lynx Train then generate, photo to video.json": "lynx_train_then_t2v_api.json",
    "Lynx Full (ID and Ref adapters), image to video.json": "lynx_full_i2v_api.json",
    "Lynx Full (ID and Ref adapters), VACE reference to video.json": "lynx_full_vace_api.json",
    "Lynx Full (ID and Ref adapters), long video, context windows.json": "lynx_full_long_context_api.json",
}
ARCFACE_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/recognition_arcface_ir_se50.pth"
LYNX_HF = "https://huggingface.co/ByteDance/lynx/resolve/main/"


def _api_pair(ui_path):
    return WORKFLOWS / "api" / TEMPLATES[ui_path.name]


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _ids(paths):
    return [str(p.relative_to(WORKFLOWS)) for p in paths]


def test_the_expected_workflows_exist():
    assert {p.name for p in UI_FILES} == set(TEMPLATES)
    for ui in UI_FILES:
        assert _api_pair(ui).is_file(), f"{ui.name} has no API twin at {_api_pair(ui)}"
    assert len(API_FILES) == len(UI_FILES)


def test_template_browser_layout():
    """ComfyUI lists custom-node templates from `<pack>/workflows/*.json` (not recursive), and loads
    them as UI graphs; API files must therefore sit in a sub-folder, and each template has the
    `<name>.jpg` thumbnail the template browser asks for."""
    for p in _all_json():
        if p.parent == WORKFLOWS:
            assert p in UI_FILES, f"{p.name} is listed as a template but is not a UI graph"
        else:
            assert p in API_FILES
    for ui in UI_FILES:
        thumb = ui.with_suffix(".jpg")
        assert thumb.is_file(), f"missing thumbnail {thumb.name}"
        assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"


@pytest.mark.parametrize("path", _all_json(), ids=_ids(_all_json()))
def test_valid_json_utf8(path):
    data = _load(path)
    assert isinstance(data, dict) and data


# -- UI format ---------------------------------------------------------------------------------


def _check_value(inp, value, where):
    if inp.type == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
    elif inp.type == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), \
            f"{where}: {value!r} is not a FLOAT"
    elif inp.type == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
    elif inp.type == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif inp.type == "COMBO":
        assert isinstance(value, str), f"{where}: {value!r} is not a COMBO entry"
        if inp.options:
            assert value in inp.options, f"{where}: {value!r} not in {inp.options}"
    for bound, ok in (("min", lambda v, b: v >= b), ("max", lambda v, b: v <= b)):
        if bound in inp.meta and inp.type in ("INT", "FLOAT"):
            assert ok(value, inp.meta[bound]), f"{where}: {value} breaks {bound}={inp.meta[bound]}"


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_ui_graph_is_consistent(path, schemas):
    g = _load(path)
    nodes = {n["id"]: n for n in g["nodes"]}
    assert len(nodes) == len(g["nodes"]), "duplicate node ids"
    links = {l[0]: l for l in g["links"]}
    assert len(links) == len(g["links"]), "duplicate link ids"
    assert g["last_node_id"] >= max(nodes) and g["last_link_id"] >= max(links)

    for n in g["nodes"]:
        where = f"{path.name} node {n['id']} ({n['type']})"
        if n["type"] in CORE["virtual"]:
            assert len(n["widgets_values"]) == len(CORE["virtual"][n["type"]]["widgets"]), where
            continue
        assert n["type"] in schemas, f"{where}: unknown node type"
        s = schemas[n["type"]]
        # every input entry names a real input, with the declared type
        for slot, inp in enumerate(n.get("inputs", [])):
            spec = s.input(inp["name"])
            assert spec is not None, f"{where}: no input named {inp['name']!r}"
            assert inp["type"] == spec.type, f"{where}: input {inp['name']} type {inp['type']} != {spec.type}"
            if inp.get("link") is not None:
                l = links[inp["link"]]
                assert (l[3], l[4]) == (n["id"], slot), f"{where}: link {l[0]} does not point at slot {slot}"
        # every required socket is connected, or the graph cannot be queued
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for sock in s.sockets:
            if sock.section == "required":
                assert sock.name in linked, f"{where}: required input {sock.name} is not connected"
        # outputs match the node's outputs and list their links
        assert [(o["name"], o["type"]) for o in n.get("outputs", [])] == [tuple(o) for o in s.outputs], where
        for slot, o in enumerate(n.get("outputs", [])):
            for lid in o.get("links") or []:
                assert (links[lid][1], links[lid][2]) == (n["id"], slot), f"{where}: output link {lid}"
        # widget values: one per widget (plus the UI-only extras), each of the right kind
        values = n.get("widgets_values", [])
        expected = s.ui_widget_values({w.name: None for w in s.widgets})
        assert len(values) == len(expected), f"{where}: {len(values)} widget values, expected {len(expected)}"
        it = iter(values)
        for w in s.widgets:
            _check_value(w, next(it), f"{where} widget {w.name}")
            if w.type == "INT" and w.name in SEED_NAMES:
                assert next(it) == _CONTROL, f"{where}: no control_after_generate after {w.name}"
            if s.image_upload and w.name == "image":
                assert next(it) == "image", f"{where}: LoadImage upload widget value"
        # the model download hints name the file the loader is set to (Lynx: the files of the
        # selected variant folder; the face encoder: ArcFace)
        for m in n.get("properties", {}).get("models", []):
            assert set(m) == {"name", "url", "directory"}, f"{where}: models hint keys {sorted(m)}"
            if n["type"] == "LoadLynxAdapters":
                assert m["name"].startswith(values[0] + "/") and m["directory"] == "lynx", where
                assert m["url"] == LYNX_HF + m["name"], f"{where}: {m['url']}"
            elif n["type"] in ("LynxEncodeFaceID", "LynxTrainingDataset"):
                assert (m["name"], m["url"], m["directory"]) == (
                    "recognition_arcface_ir_se50.pth", ARCFACE_URL, "facexlib"), where
            else:
                assert m["name"] in values, f"{where}: models hint {m['name']} is not the selected file"
                assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith("/" + m["name"])

    for lid, origin, oslot, target, tslot, ltype in g["links"]:
        o, t = nodes[origin], nodes[target]
        assert o["outputs"][oslot]["type"] == ltype == t["inputs"][tslot]["type"], f"{path.name} link {lid}"
        assert lid in (o["outputs"][oslot]["links"] or []) and t["inputs"][tslot]["link"] == lid


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_notes_say_where_every_model_file_goes(path):
    g = _load(path)
    notes = "\n".join(n["widgets_values"][0] for n in g["nodes"] if n["type"] in CORE["virtual"])
    assert "models/" in notes
    loaders = {"UNETLoader": "models/diffusion_models", "CLIPLoader": "models/text_encoders",
               "VAELoader": "models/vae", "LoadLynxAdapters": "models/lynx"}
    for n in g["nodes"]:
        if n["type"] in loaders:
            name = n["widgets_values"][0]
            assert name in notes, f"the notes do not mention {name}"
            assert loaders[n["type"]] in notes
            if n["type"] == "LoadLynxAdapters":
                for f in ("resampler.safetensors", "ip_layers.safetensors"):
                    assert f in notes
                assert ("ref_layers.safetensors" in notes) == (name == "lynx_full")
    assert "recognition_arcface_ir_se50.pth" in notes and "models/facexlib" in notes


def test_template_names_read_as_titles():
    """The template browser shows a custom pack's file name as the card title and, with - and _
    turned into spaces, as its description; the name is also part of the template's URL."""
    import re

    for ui in UI_FILES:
        name = ui.stem
        assert name.startswith("Lynx ") and len(name) <= 60, name
        assert re.fullmatch(r"[A-Za-z0-9 (),.]+", name), f"{name!r}: keep to letters, digits, spaces, (),."


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_notes_render_and_name_the_run_button(path):
    g = _load(path)
    notes = [n for n in g["nodes"] if n["type"] in CORE["virtual"]]
    assert notes
    for n in notes:
        text = n["widgets_values"][0]
        # a plain Note shows markdown literally; formatted text belongs in a MarkdownNote
        if n["type"] == "Note":
            assert not any(mark in text for mark in ("*", "`", "##")), f"note {n['id']} has markdown"
        assert "Queue" not in text, f"note {n['id']}: the front-end's button is called Run"
    how = next(n for n in notes if n.get("title") == "How to use")
    assert how["type"] == "MarkdownNote" and "**Run**" in how["widgets_values"][0]


def _tree_errors(block):
    """Lines of a box-drawing folder tree whose guides do not match their ancestors' connectors."""
    errors, open_ = [], []  # open_[d]: the last connector at depth d was a tee (a sibling follows)
    for line in block.splitlines()[1:]:
        for connector in ("├── ", "└── "):
            at = line.find(connector)
            if at >= 0:
                break
        else:
            errors.append(line)
            continue
        depth, prefix = at // 4, line[:at]
        want = "".join("│   " if is_open else "    " for is_open in open_[:depth])
        if at % 4 or depth > len(open_) or prefix != want:
            errors.append(line)
        del open_[depth:]
        open_.append(connector == "├── ")
    return errors


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_note_folder_trees_are_drawn_consistently(path):
    import re

    notes = "\n".join(n["widgets_values"][0] for n in _load(path)["nodes"] if n["type"] in CORE["virtual"])
    blocks = [b for b in re.findall(r"```\n(.*?)```", notes, re.S) if "── " in b]
    assert blocks, "the model note has a folder tree"
    for block in blocks:
        assert _tree_errors(block) == [], block
    assert _tree_errors("models/\n├── lynx/\n│   └── lynx_full/\n│   │   └── a") == ["│   │   └── a"]


@pytest.mark.parametrize("path", UI_FILES, ids=_ids(UI_FILES))
def test_missing_models_dialog_lists_the_lynx_files(path):
    """ComfyUI's Missing Models check reads ``properties.models`` (only entries named by one of the
    node's widget values) and the workflow-level ``models`` list (entries some node declares).
    The adapters widget names a folder and ArcFace has no widget, so their files are declared on
    their nodes and listed at the workflow level."""
    from nodes.comfy_env import MODEL_FOLDERS

    g = _load(path)
    variant = next(n["widgets_values"][0] for n in g["nodes"] if n["type"] == "LoadLynxAdapters")
    files = ["resampler.safetensors", "ip_layers.safetensors"] + (["ref_layers.safetensors"] if variant == "lynx_full" else [])
    declared = [m for n in g["nodes"] if n["type"] in ("LoadLynxAdapters", "LynxEncodeFaceID", "LynxTrainingDataset")
                for m in n["properties"].get("models", [])]
    assert sorted(m["name"] for m in declared) == sorted([f"{variant}/{f}" for f in files]
                                                         + ["recognition_arcface_ir_se50.pth"])
    assert g["models"] == declared
    assert {m["directory"] for m in declared} <= set(MODEL_FOLDERS)
    for n in g["nodes"]:
        values = {v for v in n.get("widgets_values", []) if isinstance(v, str)}
        for m in n.get("properties", {}).get("models", []):
            assert m["name"] in values or m in g["models"], f"node {n['id']}: {m['name']} would be dropped"


def test_default_face_photo_ships_and_is_copied_once(tmp_path, monkeypatch):
    import sys
    import types

    from lynx_core.assets import EXAMPLE_FACE
    from nodes.example_photo import copy_example_photo, install_example_photo

    for ui in [p for p in UI_FILES if any(n["type"] == "LoadImage" for n in _load(p)["nodes"])]:  # not training-only
        (load,) = [n for n in _load(ui)["nodes"] if n["type"] == "LoadImage"]
        assert load["widgets_values"][0] == EXAMPLE_FACE.name
        assert _load(_api_pair(ui))[str(load["id"])]["inputs"]["image"] == EXAMPLE_FACE.name
    # copied into ComfyUI's input folder once, complete, and never over a file of that name
    inputs = tmp_path / "input"
    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(get_input_directory=lambda: str(inputs)))
    target = install_example_photo()
    assert target == inputs / EXAMPLE_FACE.name and target.read_bytes() == EXAMPLE_FACE.read_bytes()
    assert [p.name for p in inputs.iterdir()] == [EXAMPLE_FACE.name]  # no temporary file left
    target.write_bytes(b"the user's own photo")
    assert copy_example_photo(inputs) == target and target.read_bytes() == b"the user's own photo"
    # an input folder that cannot be created: a warning, no exception (the pack must still load)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert copy_example_photo(blocker / "input") is None


# -- API format --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", API_FILES, ids=_ids(API_FILES))
def test_api_graph_is_valid(path, schemas):
    wf = _load(path)
    for nid, node in wf.items():
        where = f"{path.name} node {nid} ({node.get('class_type')})"
        assert set(node) <= {"class_type", "inputs", "_meta"} and "class_type" in node, where
        assert node["class_type"] in schemas, f"{where}: unknown or front-end-only node type"
        s = schemas[node["class_type"]]
        for name, value in node["inputs"].items():
            spec = s.input(name)
            assert spec is not None, f"{where}: {name!r} is not an input of {node['class_type']}"
            if isinstance(value, list):
                src, slot = value
                assert isinstance(src, str) and src in wf, f"{where}: {name} links to missing node {src}"
                src_schema = schemas[wf[src]["class_type"]]
                assert 0 <= slot < len(src_schema.outputs), f"{where}: {name} links to bad slot {slot}"
                assert src_schema.outputs[slot][1] == spec.type, f"{where}: {name} gets {src_schema.outputs[slot]}"
            else:
                assert spec.is_widget, f"{where}: socket {name} has a literal value"
                _check_value(spec, value, f"{where} input {name}")
        for inp in s.inputs:
            if inp.section == "required":
                assert inp.name in node["inputs"], f"{where}: required input {inp.name} missing"


@pytest.mark.parametrize("ui_path", UI_FILES, ids=_ids(UI_FILES))
def test_api_matches_ui(ui_path, schemas):
    g = _load(ui_path)
    api = _load(_api_pair(ui_path))
    real = {str(n["id"]): n for n in g["nodes"] if n["type"] not in CORE["virtual"]}
    assert set(real) == set(api), "the UI and API files have different nodes"
    for nid, n in real.items():
        a = api[nid]
        assert a["class_type"] == n["type"], nid
        assert a["_meta"]["title"] == n.get("title", a["_meta"]["title"]), f"node {nid} title"
        s = schemas[n["type"]]
        # links: each connected UI input is the same [source, slot] in the API file
        ui_links = {}
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                l = next(l for l in g["links"] if l[0] == inp["link"])
                ui_links[inp["name"]] = [str(l[1]), l[2]]
        api_links = {k: v for k, v in a["inputs"].items() if isinstance(v, list)}
        assert ui_links == api_links, f"node {nid} links differ"
        # widget values: the API literals, laid out the front-end way, equal widgets_values
        literal = {k: v for k, v in a["inputs"].items() if not isinstance(v, list)}
        assert set(literal) == {w.name for w in s.widgets if w.name not in ui_links}, f"node {nid} widgets"
        assert n["widgets_values"] == s.ui_widget_values(literal), f"node {nid} widget values differ"


# -- what the graphs are for -------------------------------------------------------------------


def _by_type(api, ctype):
    return [n for n in api.values() if n["class_type"] == ctype]


@pytest.mark.parametrize("variant,frames,fps,two_pass", [("full", 81, 16.0, False), ("lite", 121, 24.0, True)])
def test_official_defaults(variant, frames, fps, two_pass):
    api = _load(WORKFLOWS / "api" / f"lynx_{variant}_t2v_api.json")
    (sampler,) = _by_type(api, "LynxSampler")
    si = sampler["inputs"]
    assert (si["steps"], si["cfg"], si["seed"], si["shift"]) == (50, 5.0, 42, 3.0)
    assert (si["sampler_name"], si["scheduler"]) == ("lynx_unipc", "lynx_official")
    assert si.get("denoise", 1.0) == 1.0
    assert (si["cfg_id"] <= 1.0) == two_pass and (two_pass or si["cfg_id"] == 2.0)
    assert si["ip_scale"] == 1.0 and (si["start_percent"], si["end_percent"]) == (0.0, 1.0)
    (latent,) = _by_type(api, "EmptyHunyuanLatentVideo")
    assert latent["inputs"] == {"width": 832, "height": 480, "length": frames, "batch_size": 1}
    (combine,) = _by_type(api, "LynxVideoCombine")
    assert combine["inputs"]["frame_rate"] == fps
    (adapters,) = _by_type(api, "LoadLynxAdapters")
    assert adapters["inputs"]["adapters"] == f"lynx_{variant}"
    # the reference pathway exists only in full, and shares the sampler's seed
    refs = _by_type(api, "LynxEncodeReference")
    assert ("reference" in si) == (variant == "full") == (len(refs) == 1)
    if refs:
        assert refs[0]["inputs"]["seed"] == si["seed"]
        assert api[si["reference"][0]]["class_type"] == "LynxEncodeReference"
    # prompts: the negative is the official default
    neg = api[si["negative"][0]]
    assert neg["class_type"] == "CLIPTextEncode" and neg["inputs"]["text"] == OFFICIAL_NEGATIVE
    assert api[si["positive"][0]]["inputs"]["text"].strip()
    # the official ComfyUI repack files
    assert _by_type(api, "UNETLoader")[0]["inputs"]["unet_name"] == "wan2.1_t2v_14B_bf16.safetensors"
    clip = _by_type(api, "CLIPLoader")[0]["inputs"]
    assert (clip["clip_name"], clip["type"]) == ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan")
    assert _by_type(api, "VAELoader")[0]["inputs"]["vae_name"] == "wan_2.1_vae.safetensors"
    # the face photo feeds the face encoder, whose face feeds the sampler
    face = api[si["face"][0]]
    assert face["class_type"] == "LynxEncodeFaceID"
    assert api[face["inputs"]["image"][0]]["class_type"] == "LoadImage"


def test_vace_and_long_video_templates_are_wired_as_documented():
    """Lynx + VACE: the sampler takes WanVaceToVideo's conds and latent, the reference image is
    connected and its one latent frame is trimmed before decoding. Long video: the sampler's model
    comes through WAN Context Windows, and the video is longer than one window."""
    vace = _load(WORKFLOWS / "api" / "lynx_full_vace_api.json")
    (sampler,), (to_video,), (trim,) = (_by_type(vace, t) for t in ("LynxSampler", "WanVaceToVideo", "TrimVideoLatent"))
    si = sampler["inputs"]
    vace_id = next(k for k, n in vace.items() if n is to_video)
    assert (si["positive"], si["negative"], si["latent_image"]) == ([vace_id, 0], [vace_id, 1], [vace_id, 2])
    assert "reference_image" in to_video["inputs"] and trim["inputs"] == {"samples": [next(
        k for k, n in vace.items() if n is sampler), 0], "trim_amount": 1}
    assert vace[_by_type(vace, "VAEDecode")[0]["inputs"]["samples"][0]] is trim
    assert _by_type(vace, "UNETLoader")[0]["inputs"]["unet_name"] == "wan2.1_vace_14B_fp16.safetensors"

    long = _load(WORKFLOWS / "api" / "lynx_full_long_context_api.json")
    (sampler,), (windows,), (latent,) = (_by_type(long, t) for t in ("LynxSampler", "WanContextWindowsManual",
                                                                     "EmptyHunyuanLatentVideo"))
    assert long[sampler["inputs"]["model"][0]] is windows
    assert latent["inputs"]["length"] > windows["inputs"]["context_length"] > windows["inputs"]["context_overlap"]
