#!/usr/bin/env bash
# Run the ONNX-to-TensorFlow converter and the TFLite builder tests in a second virtualenv with
# TensorFlow, .venv-tf in the repository root, created on first use (and again whenever the
# requirements below change).
# Usage: bash tests/tf_env/run.sh [extra pytest args]    (PYTHON=python3.12 to pick one)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="$repo/.venv-tf"
python="${PYTHON:-python3}"
# What tests/tf_env, tests/unit/test_variants_tflite.py (shared helpers) and
# model_store/variants/{tflite,onnx_to_tf,reference,base}.py import. numpy is left unpinned:
# tensorflow-cpu pins its own range. ai-edge-litert is the interpreter devices run; the builder
# checks its files with it when it is installed (else with tf.lite).
requirements=(
    "tensorflow-cpu>=2.16" "numpy" "onnx>=1.16" "onnxruntime>=1.17" "ai-edge-litert>=1.2"
    "pydantic>=2.7,<3" "msgspec>=0.18" "pytest>=8" "pytest-timeout>=2.3"
)
stamp="$venv/.greenfleet-requirements"

if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]]; then
    echo "run.sh: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
    echo "${requirements[*]}" >"$stamp"
fi

cd "$repo"
export GF_TF_ENV=tensorflow
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# TensorFlow's C++ start-up chatter (oneDNN, CPU features) says nothing about these tests.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# --confcutdir keeps the main suite's conftest files (and their imports: paho, a broker) out.
exec "$venv/bin/python" -m pytest tests/tf_env --confcutdir=tests/tf_env \
    -p no:cacheprovider "$@"
