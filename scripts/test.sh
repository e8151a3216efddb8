#!/usr/bin/env bash
# Install ppml with its development extras into ./.venv, and Flink's own environment beside it
# (./.venv-flink: apache-flink cannot share an environment with PySpark 4), lint, type-check,
# run every test. redis-server (the serving tests run a real one) is installed when missing, and
# a test that needs it fails rather than skips.
source "$(dirname "$0")/_venv.sh"
source "$ROOT/scripts/_system.sh"
need_command redis-server redis-server
export PPML_TESTS_REQUIRE_REDIS=1
"$VENV/bin/pip" install -q -e "$ROOT[dev]"
FLINK_VENV="${FLINK_VENV:-$VENV-flink}"
echo "== Flink's environment ($FLINK_VENV)"
"$VENV/bin/ppml" flink setup --venv "$FLINK_VENV" >/dev/null
export PPML_FLINK_PYTHON="$FLINK_VENV/bin/python"
cd "$ROOT"
echo "== ruff" && "$VENV/bin/ruff" check src tests benchmarks examples
echo "== mypy" && "$VENV/bin/mypy"
echo "== pytest" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
