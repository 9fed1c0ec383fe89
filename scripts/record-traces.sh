#!/usr/bin/env bash
# Regenerate the traces shipped in traces/: MT-Bench and HumanEval at draft_len 4, greedy and
# sampled, short target-only and pre-drafting traces for the latency model, and the greedy
# acceptance profiles.
# Run it on a quiet machine: every round's timings are recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LIMIT=${LIMIT:-6}
common=(--max-new-tokens 128 --seed 0 --device cpu)
for suite in mt-bench humaneval; do
    bpsim record --suite "$suite" --limit "$LIMIT" --draft-len 4 "${common[@]}" --out "traces/$suite-greedy-k4.parquet"
    bpsim record --suite "$suite" --limit "$LIMIT" --draft-len 4 --temperature 1.0 "${common[@]}" \
        --out "traces/$suite-sampled-k4.parquet"
    bpsim profile "traces/$suite-greedy-k4.parquet" --device cpu --check
done
bpsim record --suite mt-bench --limit 2 --target-only "${common[@]}" --out traces/mt-bench-greedy-target.parquet
bpsim record --suite mt-bench --limit 2 --draft-len 4 --predraft "${common[@]}" --out traces/mt-bench-greedy-k4-predraft.parquet
