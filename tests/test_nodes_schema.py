"""Node schemas without ComfyUI: the package imports bare, and every INPUT_TYPES/RETURN_TYPES is well formed."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import nodes

REPO = Path(__file__).resolve().parents[1]

# The saved-workflow format (docs/nodes.md): class names and input names are final.
SPEC = {
    "LoadLynxAdapters": ("Load Lynx Adapters", ["adapters", "dtype"], ["ref_layers", "resampler"],
                         ["LYNX_ADAPTERS"]),
    "LynxEncodeFaceID": ("Lynx Encode Face ID",
                         ["image", "detector", "face_select", "face_index", "arcface_backend", "on_no_face"], [],
                         ["LYNX_FACE", "IMAGE", "IMAGE"]),
    "LynxEncodeReference": ("Lynx Encode Reference", ["model", "vae", "clip", "face", "adapters", "seed"],
                            ["reference_loras"], ["LYNX_REF"]),
    "LynxSampler": ("Lynx Sampler",
                    ["model", "adapters", "face", "positive", "negative", "latent_image", "seed", "steps", "cfg",
                     "cfg_id", "ip_scale", "ref_scale", "start_percent", "end_percent", "sampler_name", "scheduler",
                     "shift", "blocks_to_swap"],
                    ["reference", "denoise", "ip_blocks", "ref_blocks", "cfg_schedule", "cfg_id_schedule",
                     "ip_scale_schedule", "ref_scale_schedule"], ["LATENT"]),
    "LynxGuider": ("Lynx Guider",
                   ["model", "adapters", "face", "positive", "negative", "cfg", "cfg_id", "ip_scale", "ref_scale",
                    "start_percent", "end_percent", "blocks_to_swap"],
                   ["reference", "ip_blocks", "ref_blocks", "cfg_schedule", "cfg_id_schedule", "ip_scale_schedule",
                    "ref_scale_schedule"], ["GUIDER"]),
    "LynxUniPCSampler": ("Lynx UniPC Sampler (official)", [], [], ["SAMPLER"]),
    "LynxVideoCombine": ("Lynx Video Combine", ["images", "frame_rate", "format", "filename_prefix", "crf",
                                                "save_metadata"], ["audio"], ["STRING"]),
    "LynxFaceSimilarity": ("Lynx Face Similarity", ["images", "face", "detector"], [], ["FLOAT", "STRING", "IMAGE"]),
    "LynxTrainingDataset": ("Lynx Training Dataset",
                            ["dataset", "vae", "clip", "detector", "max_pixels", "max_frames", "frame_stride",
                             "verify_threshold"], ["heldout"], ["LYNX_DATASET", "STRING", "IMAGE"]),
    "LynxTrainAdapters": ("Lynx Train Adapters",
                          ["model", "dataset", "mode", "steps", "learning_rate", "lora_rank", "token_budget",
                           "blocks_to_swap", "save_every", "run_name", "resume", "seed"], ["adapters", "variant", "preview_every"],
                          ["LYNX_ADAPTERS", "STRING", "IMAGE", "LOSS_MAP"]),
    "LynxSaveAdapters": ("Lynx Save Adapters", ["adapters", "name", "dtype"], [], ["STRING"]),
}
DEFAULTS = {
    ("LynxSampler", "seed"): 42, ("LynxSampler", "steps"): 50, ("LynxSampler", "cfg"): 5.0,
    ("LynxSampler", "cfg_id"): 2.0, ("LynxSampler", "sampler_name"): "lynx_unipc",
    ("LynxSampler", "scheduler"): "lynx_official", ("LynxSampler", "shift"): 3.0,
    ("LynxSampler", "blocks_to_swap"): 0, ("LoadLynxAdapters", "dtype"): "auto",
    ("LynxVideoCombine", "frame_rate"): 16.0, ("LynxVideoCombine", "filename_prefix"): "Lynx/lynx",
    ("LynxVideoCombine", "crf"): 19, ("LynxVideoCombine", "save_metadata"): True,
    # New inputs keep the old numbers: their defaults are the behaviour before they existed.
    ("LynxSampler", "denoise"): 1.0, ("LynxEncodeReference", "reference_loras"): False,
    **{(node, name): "" for node in ("LynxSampler", "LynxGuider")
       for name in ("ip_blocks", "ref_blocks", "cfg_schedule", "cfg_id_schedule", "ip_scale_schedule",
                    "ref_scale_schedule")},
}
SCALAR_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def test_package_imports_without_comfyui():
    code = ("import sys, nodes; assert 'comfy' not in sys.modules and 'folder_paths' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('comfy', 'folder_paths'))); "
            "print(len(nodes.NODE_CLASS_MAPPINGS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(SPEC))


def test_comfyui_entry_point_loads_as_a_custom_node_package(tmp_path):
    """ComfyUI imports the pack folder as a package named after the folder (with a hyphen)."""
    link = tmp_path / "ComfyUI-Lynx"
    link.symlink_to(REPO, target_is_directory=True)
    code = (
        "import importlib.util, sys, json\n"
        f"spec = importlib.util.spec_from_file_location('ComfyUI-Lynx', r'{link / '__init__.py'}', "
        f"submodule_search_locations=[r'{link}'])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['ComfyUI-Lynx'] = mod; spec.loader.exec_module(mod)\n"
        "print(json.dumps({'nodes': sorted(mod.NODE_CLASS_MAPPINGS), 'names': mod.NODE_DISPLAY_NAME_MAPPINGS, "
        "'web': mod.WEB_DIRECTORY}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["nodes"] == sorted(SPEC)
    assert data["names"] == {k: v[0] for k, v in SPEC.items()}
    assert data["web"] == "./web"


def test_mappings_match_the_spec():
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(SPEC)
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == {k: v[0] for k, v in SPEC.items()}


def _check_input(node: str, name: str, spec) -> None:
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, f"{node}.{name}: {spec!r}"
    kind = spec[0]
    opts = spec[1] if len(spec) == 2 else {}
    assert isinstance(opts, dict)
    assert isinstance(opts.get("tooltip"), str) and len(opts["tooltip"]) > 10, f"{node}.{name} has no tooltip"
    if isinstance(kind, list):
        assert kind, f"{node}.{name}: empty choice list"
        assert all(isinstance(c, str) for c in kind)
        if "default" in opts:
            assert opts["default"] in kind, f"{node}.{name}: default {opts['default']!r} not among choices"
        return
    assert isinstance(kind, str) and kind, f"{node}.{name}"
    if kind in ("INT", "FLOAT"):
        lo, hi, default = opts["min"], opts["max"], opts["default"]
        assert lo <= default <= hi, f"{node}.{name}: default {default} outside [{lo}, {hi}]"
        assert isinstance(default, int if kind == "INT" else float)
    elif kind in ("STRING", "BOOLEAN"):
        assert "default" in opts


@pytest.mark.parametrize("name", sorted(SPEC))
def test_node_schema(name):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    display, required, optional, returns = SPEC[name]
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"}
    assert list(types["required"]) == required
    assert list(types.get("optional", {})) == optional
    for section in ("required", "optional"):
        for input_name, spec in types.get(section, {}).items():
            if not (name == "LoadLynxAdapters" and input_name == "adapters"):  # empty without models/lynx
                _check_input(name, input_name, spec)
            if (name, input_name) in DEFAULTS:
                assert spec[1]["default"] == DEFAULTS[(name, input_name)], f"{name}.{input_name}"
    assert list(cls.RETURN_TYPES) == returns
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)
    assert cls.CATEGORY.startswith("Lynx/") and cls.CATEGORY.split("/")[1] in {"loaders", "face", "sampling", "video", "training"}
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    for input_name in list(types["required"]) + list(types.get("optional", {})) + list(types.get("hidden", {})):
        assert input_name in params, f"{name}.{cls.FUNCTION} does not take {input_name}"
    # Optional and hidden inputs must have defaults: ComfyUI omits them when unconnected.
    for input_name in list(types.get("optional", {})) + list(types.get("hidden", {})):
        assert params[input_name].default is not inspect.Parameter.empty, f"{name}.{input_name}"


def test_sampler_lists_offer_the_official_choices_without_comfyui():
    req = nodes.NODE_CLASS_MAPPINGS["LynxSampler"].INPUT_TYPES()["required"]
    assert req["scheduler"][0][0] == "lynx_official"
    assert "uni_pc_bh2" in req["sampler_name"][0]
    assert nodes.NODE_CLASS_MAPPINGS["LynxVideoCombine"].OUTPUT_NODE is True
    hidden = nodes.NODE_CLASS_MAPPINGS["LynxVideoCombine"].INPUT_TYPES()["hidden"]
    assert hidden == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
