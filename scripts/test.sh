#!/usr/bin/env bash
# Runs the whole test suite: lint, type checks, then every test. Extra arguments go to pytest.
source "$(dirname "$0")/_venv.sh"
source scripts/_system.sh

echo "== ruff" >&2
ruff check src controlplane tests examples benchmarks
echo "== mypy (strict)" >&2
mypy
echo "== pytest" >&2
exec pytest "$@"
