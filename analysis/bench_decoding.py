"""Measure decoding speed side by side: target-only against speculative decoding, and the recorder's overhead.

Every prompt is decoded by every policy in turn (the order rotates per prompt), so a slow
moment of the machine hits all policies alike. Tokens per second count new tokens over the
whole request, prompt passes included. The recorder's cost is measured as speculative
decoding at the same draft_len with and without writing each request to a Parquet trace.

    python analysis/bench_decoding.py --suite mt-bench --limit 8 --out docs/bench-decoding.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bpsim.commands.record import run_metadata
from bpsim.decoding import DecodeConfig, SpeculativeDecoder
from bpsim.models import load_pair
from bpsim.prompts import encode_prompt, load_suite
from bpsim.traces import TraceWriter


def bootstrap_speed_ratio(tokens, seconds, base_tokens, base_seconds, resamples: int = 2000, seed: int = 0):
    """95% interval of a policy's tokens/s over the target-only tokens/s, resampling prompts in pairs."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(tokens), size=(resamples, len(tokens)))
    ratios = (tokens[index].sum(1) / seconds[index].sum(1)) / (base_tokens[index].sum(1) / base_seconds[index].sum(1))
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="mt-bench")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--skip", type=int, default=0, help="skip the first N prompts of the suite")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--draft-lens", default="1,2,4", help="speculative draft_len values to compare")
    parser.add_argument("--record-draft-len", type=int, default=4, help="draft_len of the recorder overhead pair")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every policy on every prompt")
    parser.add_argument("--dtype", default="float32", help="weights and activations dtype of both models (default float32)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    pair = load_pair(device="cpu", dtype=args.dtype)
    suite = load_suite(args.suite)
    prompts = suite.prompts[args.skip: args.skip + args.limit]
    draft_lens = [int(x) for x in args.draft_lens.split(",")]
    policies = ["target-only"] + [f"speculative k={k}" for k in draft_lens] + [f"recorded k={args.record_draft_len}"]
    tokens = {name: [] for name in policies}
    seconds = {name: [] for name in policies}
    scratch = Path(tempfile.mkdtemp(prefix="bpsim-bench-"))

    def run_policy(name: str, ids: list[int], index: int) -> tuple[int, float]:
        if name == "target-only":
            draft_len = 0
        else:
            draft_len = int(name.split("k=")[1])
        config = DecodeConfig(draft_len=draft_len, max_new_tokens=args.max_new_tokens)
        decoder = SpeculativeDecoder.from_pair(pair, config)
        start = time.perf_counter()
        generation = decoder.generate(ids)
        if name.startswith("recorded"):
            path = scratch / f"trace-{index}.parquet"
            metadata = run_metadata(pair, suite, config, args.suite, {prompts[index].prompt_id: ids})
            writer = TraceWriter(path, metadata, overwrite=True)
            writer.add_request(index, prompts[index].prompt_id, generation.rounds)
            writer.close()
        return len(generation.tokens), time.perf_counter() - start

    for index, prompt in enumerate(prompts):
        ids = encode_prompt(pair.tokenizer, prompt)
        counts = {name: 0 for name in policies}
        elapsed = {name: 0.0 for name in policies}
        for repeat in range(args.repeats):
            shift = (index + repeat) % len(policies)
            for name in policies[shift:] + policies[:shift]:
                count, took = run_policy(name, ids, index)
                counts[name] += count
                elapsed[name] += took
        for name in policies:
            tokens[name].append(counts[name])
            seconds[name].append(elapsed[name])
        print(f"prompt {index + 1}/{len(prompts)} done", flush=True)

    results = {}
    base_tokens = np.array(tokens["target-only"], dtype=float)
    base_seconds = np.array(seconds["target-only"], dtype=float)
    for name in policies:
        t, s = np.array(tokens[name], dtype=float), np.array(seconds[name], dtype=float)
        speed = t.sum() / s.sum()
        low, high = bootstrap_speed_ratio(t, s, base_tokens, base_seconds)
        results[name] = {"tokens": int(t.sum()), "seconds": float(s.sum()), "tokens_per_s": float(speed),
                         "vs_target_only": float(speed / (base_tokens.sum() / base_seconds.sum())),
                         "vs_target_only_interval": [low, high]}
    spec_name = f"speculative k={args.record_draft_len}"
    overhead = None
    if spec_name in results:
        overhead = 1 - results[f"recorded k={args.record_draft_len}"]["tokens_per_s"] / results[spec_name]["tokens_per_s"]
    report = {
        "command": "python analysis/bench_decoding.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "prompts": [p.prompt_id for p in prompts], "results": results, "recorder_overhead": overhead,
    }
    print(f"{'policy':<20} {'tokens/s':>9} {'vs target-only':>22}")
    for name, row in results.items():
        low, high = row["vs_target_only_interval"]
        print(f"{name:<20} {row['tokens_per_s']:>9.1f} {row['vs_target_only']:>8.2f} [{low:.2f}, {high:.2f}]")
    if overhead is not None:
        print(f"recorder overhead at draft_len {args.record_draft_len}: {100 * overhead:.1f}% of tokens/s")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
