#!/usr/bin/env bash
# The lower bound on torch in pyproject.toml is the oldest release this script has passed with:
# a fresh venv with that torch, the core install (no timm/torchvision: they need torch >= 2.14),
# and the fast suite, whose timm/torchvision/vit-pytorch tests skip themselves.
#
#   tools/oldest_torch.sh                       # torch==2.13.0 (pip may take a local CPU wheel)
#   tools/oldest_torch.sh /path/to/torch.whl    # a given wheel
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec="${1:-torch==2.13.0}"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python -m venv "$venv"
"$venv/bin/python" -m pip install -q "$torch_spec"
# the package's own dependencies, then the test tools; --no-deps keeps the torch above
"$venv/bin/python" -m pip install -q --no-deps -e .
"$venv/bin/python" -m pip install -q "einops>=0.8" "safetensors>=0.8" "tqdm>=4.70" \
    "transformers>=5.24" "scikit-learn>=1.9" "matplotlib>=3.11" \
    pytest hypothesis onnx onnxscript onnxruntime
"$venv/bin/python" -c "import torch; print('torch', torch.__version__)"
"$venv/bin/python" -m pytest -q -o addopts="" -m "not slow and not distributed"
