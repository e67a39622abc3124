#!/usr/bin/env bash
# Re-pin the stack: test the newest versions pyproject's bounds allow (.venv-latest) and, if the suite passes,
# write them to constraints.txt. Widen a bound in pyproject.toml first to move to a new minor (docs/upgrading.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test-latest
{
  echo "# The tested stack: scripts/setup.sh installs exactly these (pip -c). Regenerate with scripts/lock.sh."
  .venv-latest/bin/python -m pip freeze --exclude-editable | grep -v -i "^halluscope" | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
echo "wrote constraints.txt"
