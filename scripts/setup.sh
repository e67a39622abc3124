#!/usr/bin/env bash
# Set up .venv (CPU torch first, so no dependency can pull a CUDA build) and run one job:
#   bash scripts/setup.sh demo    # the main job: the whole pipeline on the built-in model
#   bash scripts/setup.sh test    # the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1
case "$job" in
  test) .venv/bin/python -m pytest -q ;;
  demo) .venv/bin/halluscope demo --out runs/demo ;;
  *) echo "usage: bash scripts/setup.sh demo|test" >&2; exit 2 ;;
esac
