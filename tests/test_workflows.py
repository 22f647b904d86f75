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


def _api_pair(ui_path):
    return WORKFLOWS / "api" / f"{ui_path.stem}_api.json"


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _ids(paths):
    return [str(p.relative_to(WORKFLOWS)) for p in paths]


def test_the_expected_workflows_exist():
    assert {p.name for p in UI_FILES} >= {"lynx_full_t2v.json", "lynx_lite_t2v.json"}
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
        # the model download hints name the file the loader is set to
        for m in n.get("properties", {}).get("models", []):
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
    assert (si["sampler_name"], si["scheduler"]) == ("uni_pc_bh2", "lynx_official")
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
