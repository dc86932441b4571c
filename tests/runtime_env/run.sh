#!/usr/bin/env bash
# Run the agent's TFLite backend against the old tflite-runtime package (numpy<2) in a second
# virtualenv, .venv-tflite-runtime in the repository root, created on first use.
# Usage: bash tests/runtime_env/run.sh [extra pytest args]    (PYTHON=python3.11 to pick one)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$repo/.venv-tflite-runtime"
python="${PYTHON:-python3}"
# tflite-runtime 2.14.0 is built against numpy 1.x and has wheels for CPython 3.8-3.11 only.
requirements=("numpy<2" "tflite-runtime==2.14.0" "msgspec>=0.18" "pytest>=8" "pytest-timeout>=2.3")
stamp="$venv/.greenfleet-requirements"

if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]]; then
    echo "run.sh: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
    echo "${requirements[*]}" >"$stamp"
fi

cd "$repo"
export GF_RUNTIME_ENV=tflite-runtime
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# --confcutdir keeps the main suite's conftest files (and their imports) out of this env.
exec "$venv/bin/python" -m pytest tests/runtime_env --confcutdir=tests/runtime_env \
    -p no:cacheprovider "$@"
