#!/usr/bin/env bash
# Runs the demo on the embedded default: the example mesh in examples/mesh, no services needed.
source "$(dirname "$0")/_venv.sh"
exec python examples/demo.py "$@"
