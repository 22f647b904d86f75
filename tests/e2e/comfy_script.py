"""Run a Python script inside ComfyUI's own modules (the server's Python and ComfyUI checkout, on the CPU).

For what a graph cannot show (the numbers ComfyUI's objects produce). The script gets ``PRELUDE``
first: ComfyUI on the CPU and this pack imported as ``lynx_nodes`` (ComfyUI's nodes.py owns the name
``nodes``); ``sys.argv[1]`` is the repository, ``sys.argv[2]`` a JSON dict of model paths and any
further arguments follow. The script prints one ``RESULT {json}`` line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PRELUDE = r'''
import importlib.util, json, sys
from comfy.cli_args import args
args.cpu = True
import numpy as np, torch
spec = importlib.util.spec_from_file_location("lynx_nodes", sys.argv[1] + "/nodes/__init__.py",
                                              submodule_search_locations=[sys.argv[1] + "/nodes"])
lynx_nodes = importlib.util.module_from_spec(spec); sys.modules["lynx_nodes"] = lynx_nodes
spec.loader.exec_module(lynx_nodes)
models = json.loads(sys.argv[2])
'''


def model_paths(server) -> dict[str, str]:
    m = server.models_dir
    return {"dit": str(m / "diffusion_models" / server.models["diffusion_model"]),
            "vae": str(m / "vae" / server.models["vae"]),
            "te": str(m / "text_encoders" / server.models["text_encoder"])}


def run_in_comfy(server, script: str, *args: str, timeout: float = 600) -> dict:
    comfy = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(comfy), str(REPO)]), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([python, "-c", PRELUDE + script, str(REPO), json.dumps(model_paths(server)), *args],
                          cwd=str(server.base_dir), env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads(lines[-1][len("RESULT "):])
