#!/usr/bin/env bash
# Install ppml with its development extras into ./.venv, lint, type-check, run every test.
source "$(dirname "$0")/_venv.sh"
"$VENV/bin/pip" install -q -e "$ROOT[dev]"
cd "$ROOT"
echo "== ruff" && "$VENV/bin/ruff" check src tests benchmarks examples
echo "== mypy" && "$VENV/bin/mypy"
echo "== pytest" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
