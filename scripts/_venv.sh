# Sourced by the other scripts: makes ./.venv with libmesh and its test tools installed.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=""
for candidate in python3.11 python3.12 python3.13 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "libmesh needs Python 3.11 or newer (on Debian: apt install python3 python3-venv)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)" >&2
  "$python" -m venv .venv || {
    echo "could not create a virtual environment (on Debian: apt install python3-venv)" >&2
    exit 1
  }
fi

stamp=.venv/.libmesh-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
  echo "installing libmesh and its test tools into .venv ..." >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]' >&2
  # xds-protos ships stale copies of OpenTelemetry's protos (grpc/grpc#42926): whichever of it
  # and opentelemetry-proto installed last wins, so make it opentelemetry-proto's.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --force-reinstall \
    --no-deps "opentelemetry-proto==$(.venv/bin/python -c \
    'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" >&2
  echo "$wanted" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
