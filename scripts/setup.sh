#!/usr/bin/env bash
# Set up a virtual environment (CPU torch first, so no dependency can pull a CUDA build) and run one job:
#   bash scripts/setup.sh demo          # the main job: the whole pipeline on the built-in model
#   bash scripts/setup.sh test          # the test suite, on the tested stack pinned in constraints.txt
#   bash scripts/setup.sh test-latest   # the test suite on the newest versions pyproject's bounds allow
#                                       # (.venv-latest), to see drift before users meet it
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"
torch_version="2.13.0"  # the CPU wheel; pyproject bounds torch to this minor

case "$job" in
  demo|test) venv=.venv; pins=(-c constraints.txt) ;;
  test-latest) venv=.venv-latest; pins=() ;;
  *) echo "usage: bash scripts/setup.sh demo|test|test-latest" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==$torch_version"
if [ "$job" = test-latest ]; then
  # --upgrade: a reused .venv-latest moves to the newest allowed releases too
  "$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager "torch==$torch_version" -e ".[test,ray,train]"
else
  "$venv/bin/python" -m pip install -q "${pins[@]}" -e ".[test,ray,train]"
fi
export HF_HUB_OFFLINE=1
case "$job" in
  test|test-latest)
    "$venv/bin/python" -c "import transformers, torch; print(f'testing with transformers {transformers.__version__}, torch {torch.__version__}')"
    "$venv/bin/python" -m pytest -q ;;
  demo) "$venv/bin/halluscope" demo --out runs/demo ;;
esac
