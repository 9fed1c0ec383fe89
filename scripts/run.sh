#!/usr/bin/env bash
# Set up the environment and run the main job: the whole pipeline on the built-in pair and
# MT-Bench, written into runs/pipeline (extra arguments are passed to bpsim pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bpsim pipeline "$@"
