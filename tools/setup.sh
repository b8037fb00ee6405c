#!/usr/bin/env bash
# Set up everything distill needs on a fresh Debian machine: Fashion-MNIST (Debian package), a virtualenv in
# .venv with a working torch/torchvision pair, and distill itself (editable, with test extras).
# Usage: bash tools/setup.sh        (idempotent: a second run only checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "== installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "!! Fashion-MNIST missing: run 'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist'," \
         "or pass --data-root / data_root pointing at the four IDX files." >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# this checkout installed under its old distribution name 'distill' (editable, this directory): replaced, never another
# project of that name
if python -I -c "import importlib.metadata as m, json, pathlib, sys
u = json.loads(m.distribution('distill').read_text('direct_url.json') or '{}').get('url', '')
sys.exit(u.removeprefix('file://') != str(pathlib.Path.cwd()))" 2>/dev/null; then
  echo "== replacing the distribution 'distill' (old name) by 'diffusion-distill'"
  python -m pip uninstall -y -q distill
fi
if ! python -c "import torch, torchvision, timm, diffusers, accelerate, kornia, torchmetrics, datasets, huggingface_hub, distill
import importlib.metadata as m; m.version('diffusion-distill')" 2>/dev/null; then
  echo "== installing torch/torchvision pair and distill (about 2 minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -c tools/constraints.txt torch torchvision
  python -m pip install -q -c tools/constraints.txt -e ".[test]"
fi
python -c "import torch, torchvision, timm, distill; print('ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
