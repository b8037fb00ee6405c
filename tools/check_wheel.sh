#!/usr/bin/env bash
# Build the sdist and the wheel, check what each holds, install the wheel (not editable) into a clean virtualenv and
# run the installed `distill` from another directory: --version, recipes, a 2-step quickstart, export.
# Usage: bash tools/check_wheel.sh [WORKDIR]     (WORKDIR default: a new temporary folder, removed at the end)
# Environment: PYTHON (default .venv/bin/python: builds with its `build`, the dev extra, and makes the virtualenv).
# torch/torchvision in the clean virtualenv: the pair pinned in tools/constraints.txt, as tools/setup.sh installs it.
# Fashion-MNIST must be installed (tools/setup.sh does it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
if [ -n "${1:-}" ]; then WORK=$1; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
t0=$(date +%s)

echo "== python -m build (sdist + wheel) -> $WORK/dist"
"$PY" -m build -q -o "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
VERSION=$("$PY" -c "import re; print(re.search(r'__version__ = \"(.+)\"', open('distill/version.py').read())[1])")
WHEEL=$WORK/dist/diffusion_distill-$VERSION-py3-none-any.whl
SDIST=$WORK/dist/diffusion_distill-$VERSION.tar.gz
[ -f "$WHEEL" ] && [ -f "$SDIST" ] || { echo "!! expected $WHEEL and $SDIST; built: $(ls "$WORK/dist")" >&2; exit 1; }

echo "== contents"
"$PY" - "$WHEEL" "$SDIST" "$VERSION" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path
wheel, sdist, version = sys.argv[1:]
recipes = sorted(p.name for p in Path("recipes").glob("*.yaml"))
teachers = sorted(p.parent.parent.name for p in Path("distill/teacher/packaged").glob("*/unet/*.safetensors"))
w = set(zipfile.ZipFile(wheel).namelist())
prefix = f"diffusion_distill-{version}/"
s = {n.removeprefix(prefix) for n in tarfile.open(sdist).getnames()}
need_w = [f"distill/shipped_recipes/{r}" for r in recipes] + [
    f"distill/teacher/packaged/{t}/{f}" for t in teachers
    for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", "README.md")] + ["distill/cli/__init__.py", "distill/version.py"]
need_s = need_w[:-2] + [f"recipes/{r}" for r in recipes] + [
    "tests/conftest.py", "tests/_wiring.py", "tools/setup.sh", "tools/constraints.txt", "tools/check_wheel.sh",
    "docs/recipe-keys.md", "docs/api/index.md", "mkdocs.yml", "CHANGELOG.md", "README.md", "LICENSE", ".ci/run",
    "pyproject.toml"]
missing = [f"wheel: {n}" for n in need_w if n not in w] + [f"sdist: {n}" for n in need_s if n not in s]
if not recipes or not teachers:
    missing.append(f"recipes {recipes} / teachers {teachers} not found in the checkout")
if missing:
    sys.exit("!! missing:\n  " + "\n  ".join(missing))
stray = sorted(n for n in w if not n.startswith(("distill/", f"diffusion_distill-{version}.dist-info/")))
if stray:
    sys.exit(f"!! the wheel holds files outside the package: {stray[:10]}")
print(f"ok: wheel {Path(wheel).stat().st_size / 2**20:.1f} MiB ({len(w)} files: {len(recipes)} recipes, teachers "
      f"{', '.join(teachers)}); sdist {Path(sdist).stat().st_size / 2**20:.1f} MiB ({len(s)} files)")
EOF

echo "== clean virtualenv, wheel installed (not editable)"
"$PY" -m venv "$WORK/venv"   # from a virtualenv's python: a new one on the same base interpreter, nothing shared
V=$WORK/venv/bin
"$V/python" -m pip install -q --upgrade pip
"$V/python" -m pip install -q -c tools/constraints.txt torch torchvision
"$V/python" -m pip install -q -c tools/constraints.txt "$WHEEL"
"$V/python" -m pip show -f diffusion-distill | grep -q "Editable project location" && { echo "!! editable install" >&2; exit 1; }

echo "== the installed distill, from another directory"
mkdir -p "$WORK/elsewhere" && cd "$WORK/elsewhere"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONPATH= HF_HUB_OFFLINE=1
"$V/python" -c "import distill, pathlib; p = pathlib.Path(distill.__file__).resolve(); \
assert '$ROOT' not in str(p), p; print('imported from', p.parent)"
out=$("$V/distill" --version); echo "$out"; [ "$out" = "distill $VERSION" ]
"$V/distill" recipes | tee recipes.txt; grep -q "^quickstart" recipes.txt
# quickstart made tiny: 2 steps of 8 images at 32 px, no augmentation (tests/test_recipes.py keeps it this small)
"$V/distill" train quickstart -o RUN --no-progress --set steps=2 batch_size=8 student_size=32 regressor_width=16 \
    checkpoint_every=2 log_every=1 warmup_steps=0 num_workers=0
"$V/distill" export RUN -o RUN/student
"$V/python" -c "import timm; m = timm.create_model('local-dir:RUN/student', pretrained=True, num_classes=0); \
print('timm loads the export:', type(m).__name__, m.num_features, 'features')"
echo "ok: wheel checked in $(( $(date +%s) - t0 )) s"
