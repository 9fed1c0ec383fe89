"""Replay two of the method's experiments on recorded profiles and write a table and a plot.

1. The effect of the number of tokens drafted per round: plain speculative decoding at
   draft_len 1..8 against the target alone and the oracle ceiling.
2. What a predictor could know: how much a position's greedy match depends on the previous
   position's and on the draft's confidence, from the greedy profiles.
3. The exhaustive strategy's trade-off: each history predictor pre-drafting no branch point
   (it only sets draft lengths), 1, 2, 4 or every branch point at once, speed against wasted
   draft tokens.

Both come from one exact greedy replay (``bpsim replay``) with the latency model fitted on the
traces next to the profiles, so they cost seconds, not model runs.

    python analysis/draft_len_and_exhaustive.py traces/mt-bench-greedy-k4.profile.parquet \
        traces/mt-bench-greedy-target.parquet \
        --latency-traces traces/mt-bench-greedy-k4-predraft.parquet --out docs/experiments
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def replay(inputs: list[str], latency_traces: list[str], scratch: Path) -> dict:
    command = [sys.executable, "-m", "bpsim.cli", "replay", *inputs, "--draft-lens", "1,2,3,4,5,6,7,8",
               "--exhaustive", "2,4,all", "--sequential", "--device", "cpu", "--out", str(scratch)]
    if latency_traces:
        command += ["--latency-traces", *latency_traces]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((scratch / "replay.json").read_text())


def predictability(inputs: list[str]) -> list[str]:
    """Return Markdown rows: the greedy match rate by the previous position's match and by the draft's confidence."""
    import numpy as np
    import pyarrow.parquet as pq

    match, previous, confidence = [], [], []
    for path in (p for p in inputs if p.endswith(".profile.parquet")):
        for row in pq.read_table(path, columns=["match", "draft_max_prob"]).to_pylist():
            m = np.asarray(row["match"], dtype=bool)
            match.append(m[1:])
            previous.append(m[:-1])
            confidence.append(np.asarray(row["draft_max_prob"], dtype=float)[1:])
    if not match:
        return []
    match, previous, confidence = (np.concatenate(a) for a in (match, previous, confidence))
    rows = [("every position", np.ones_like(match)), ("after a matching position", previous),
            ("after a mismatch", ~previous)]
    rows += [(f"draft max probability above {t}", confidence > t) for t in (0.3, 0.5, 0.7, 0.9)]
    lines = ["## What a predictor could know", "",
             f"Greedy profiles, {len(match)} positions: how often the draft's greedy token is the target's.", "",
             "| positions | share of positions | match rate |", "| --- | --- | --- |"]
    lines += [f"| {label} | {mask.mean():.3f} | {match[mask].mean():.3f} |" for label, mask in rows if mask.any()]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="profiles and traces, as bpsim replay takes them")
    parser.add_argument("--latency-traces", nargs="+", default=[],
                        help="pre-drafting traces that time the overlap (bpsim record --predraft)")
    parser.add_argument("--out", type=Path, required=True, help="folder for experiments.md and the plots")
    args = parser.parse_args()
    result = replay(args.inputs, args.latency_traces, Path(tempfile.mkdtemp(prefix="bpsim-experiments-")))
    policies = result["policies"]
    args.out.mkdir(parents=True, exist_ok=True)

    plain = sorted((p for p in policies if p["kind"] == "plain"), key=lambda p: p["draft_len"])
    target = next(p for p in policies if p["kind"] == "target")
    oracle = [p for p in policies if p["kind"] == "oracle"]
    lines = ["# Replayed experiments", "",
             f"Inputs: {', '.join(f'`{i}`' for i in args.inputs)}"
             + (f", latency only: {', '.join(f'`{i}`' for i in args.latency_traces)}" if args.latency_traces else "")
             + f"; {result['mode']} replay of "
             f"{result['requests']} requests, {result['tokens']} tokens, "
             f"{int(result['confidence'] * 100)}% bootstrap intervals over requests.", "",
             "## Tokens drafted per round", "", "| policy | tokens/s | vs target |", "| --- | --- | --- |"]

    def row(policy):
        speed, ratio = policy["tokens_per_s"], policy["speedup_vs_target"]
        return (f"| `{policy['name']}` | {speed['value']:.1f} [{speed['low']:.1f}, {speed['high']:.1f}] | "
                f"{ratio['value']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}] |")

    lines += [row(p) for p in [target, *plain, *oracle]]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.errorbar([p["draft_len"] for p in plain], [p["speedup_vs_target"]["value"] for p in plain],
                  yerr=[[p["speedup_vs_target"]["value"] - p["speedup_vs_target"]["low"] for p in plain],
                        [p["speedup_vs_target"]["high"] - p["speedup_vs_target"]["value"] for p in plain]],
                  marker="o", label="plain speculative")
    for policy in oracle:
        axis.axhline(policy["speedup_vs_target"]["value"], linestyle="--", color="gray", label="oracle")
    axis.axhline(1.0, color="black", linewidth=0.8, label="target alone")
    axis.set_xlabel("draft_len")
    axis.set_ylabel("speed / target alone")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "draft-len.png", dpi=120)
    lines += ["", "![draft_len](draft-len.png)", ""]

    exhaustive = [p for p in policies if p.get("width") not in (None, 1) and p["kind"] not in ("plain", "target")]
    single = [p for p in policies if p["kind"] not in ("plain", "target", "oracle", "sequential")
              and p.get("width") in (None, 1)]
    sequential = [p for p in policies if p["kind"] == "sequential"]
    lines += predictability(args.inputs)
    lines += ["## Exhaustive strategy", "",
              "Branch points 0 is the predictor without pre-drafting: it only sets the next draft_len.", "",
              "| policy | branch points | tokens/s | vs target | hit rate | wasted drafts per token |",
              "| --- | --- | --- | --- | --- | --- |"]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    seen_labels: set[str] = set()
    for policy in sequential + single + exhaustive:
        hit = policy["hit_rate"]["value"] if policy.get("hit_rate") else float("nan")
        speed, ratio = policy["tokens_per_s"], policy["speedup_vs_target"]
        width = policy.get("width")
        branches = "all" if width == 0 else (width or 1)  # width 0 pre-drafts every branch point
        if policy["kind"] == "sequential":
            branches = 0
        lines.append(f"| `{policy['name']}` | {branches} | {speed['value']:.1f} | "
                     f"{ratio['value']:.2f} | {hit:.2f} | {policy['wasted_per_token']:.2f} |")
        label = f"{branches} branch point(s)" if branches != 0 else "no pre-draft"
        color = {0: "C0", 1: "C1", 2: "C2", 4: "C3", "all": "C4"}.get(branches, "C5")
        axis.scatter(policy["wasted_per_token"], ratio["value"], s=12, color=color,
                     label=label if label not in seen_labels else None)
        seen_labels.add(label)
    axis.legend(fontsize=8)
    axis.set_xlabel("wasted draft tokens per output token")
    axis.set_ylabel("speed / target alone")
    figure.tight_layout()
    figure.savefig(args.out / "exhaustive.png", dpi=120)
    lines += ["", "![exhaustive](exhaustive.png)", "", "Latency model of the replay:", "", "```",
              json.dumps(result["latency"], indent=1), "```", ""]
    (args.out / "experiments.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'experiments.md'}")


if __name__ == "__main__":
    main()
