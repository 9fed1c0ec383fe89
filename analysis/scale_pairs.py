"""Compare draft/target scale pairs by replay: 2-, 4- and 6-layer drafts of the built-in target.

A greedy trace's output does not depend on the draft (decoding is lossless), so profiling the
same trace with each draft gives each pair's exact greedy acceptances on the same text. The
draft's cost comes from its card: the latency model fitted on the trace's timings (recorded
with the shipped 4-layer draft) gets ``draft_ms_per_token`` scaled by the ratio of the drafts'
measured per-token latencies, set with ``--assume`` and labelled as assumed in the output.
With ``--predraft-trace`` (a trace of the shipped pair recorded with ``bpsim record --predraft``)
the pre-draft overlap and overhead measured with the shipped draft are assumed for every draft.
Build the other drafts first: ``bpsim draft build --layers 2`` and ``--layers 6``.

    python analysis/scale_pairs.py traces/mt-bench-greedy-k4.parquet traces/mt-bench-greedy-target.parquet \
        --predraft-trace traces/mt-bench-greedy-k4-predraft.parquet \
        --drafts smollm2-135m-draft2,smollm2-135m-draft4,smollm2-135m-draft6 --out docs/experiments
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bpsim.models import DRAFTS_DIR, load_pair
from bpsim.profile import profile_table, write_profile
from bpsim.traces import read_trace


def bpsim(*arguments: str) -> None:
    subprocess.run([sys.executable, "-m", "bpsim.cli", *arguments], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="a greedy speculative trace recorded with the shipped draft")
    parser.add_argument("target_only", type=Path, help="a target-only trace of the same target, for verify timings")
    parser.add_argument("--drafts", default="smollm2-135m-draft2,smollm2-135m-draft4,smollm2-135m-draft6")
    parser.add_argument("--reference-draft", default="smollm2-135m-draft4", help="the draft the trace was recorded with")
    parser.add_argument("--predraft-trace", type=Path, default=None,
                        help="a pre-drafting trace of the shipped pair, whose measured overlap every draft assumes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    predraft_assumptions = _predraft_assumptions(args) if args.predraft_trace else []

    cards = {}
    for name in args.drafts.split(","):
        config = DRAFTS_DIR / name / "config.json"
        if not config.is_file():
            raise SystemExit(f"draft {name} is not built ({config} missing); build it with bpsim draft build")
        cards[name] = json.loads(config.read_text())
    reference_ms = cards[args.reference_draft]["latency"]["draft_ms_per_token"]

    scratch = Path(tempfile.mkdtemp(prefix="bpsim-scale-"))
    rows = []
    for name, card in cards.items():
        folder = scratch / name
        folder.mkdir()
        trace = folder / args.trace.name
        shutil.copy(args.trace, trace)
        profile = folder / (args.trace.name[: -len(".parquet")] + ".profile.parquet")
        pair = load_pair(card["target"], name, device="cpu", dtype="float32")
        write_profile(profile_table(read_trace(trace), pair, other_draft=True), profile)
        replay = folder / "replay"
        # The trace's fitted draft cost belongs to the reference draft; scale it to this one.
        fitted = _fitted_draft_ms(profile, args.target_only, folder)
        scaled = fitted * card["latency"]["draft_ms_per_token"] / reference_ms
        bpsim("replay", str(profile), str(args.target_only), "--device", "cpu", "--assume",
              f"draft_ms_per_token={scaled}", *predraft_assumptions, "--sequential", "--out", str(replay))
        result = json.loads((replay / "replay.json").read_text())
        policies = {p["name"]: p for p in result["policies"]}
        plain = [p for p in result["policies"] if p["kind"] == "plain"]
        best_plain = max(plain, key=lambda p: p["tokens_per_s"]["value"])
        predictors = [p for p in result["policies"] if p["kind"] not in ("plain", "target", "oracle", "sequential")]
        best_predictor = max(predictors, key=lambda p: p["tokens_per_s"]["value"])
        best_sequential = max((p for p in result["policies"] if p["kind"] == "sequential"),
                              key=lambda p: p["tokens_per_s"]["value"])
        oracle = next(p for p in result["policies"] if p["kind"] == "oracle")
        rows.append({
            "draft": name, "layers": len(card["layers_from_target"]), "steps": card["recipe"]["steps"],
            "agreement": card["mt_bench_agreement"]["agreement"], "latency_ratio": card["latency"]["ratio"],
            "draft_ms_per_token": scaled, "target": policies["target"]["tokens_per_s"]["value"],
            "best_plain": (best_plain["draft_len"], best_plain["speedup_vs_target"]["value"]),
            "best_predictor": (best_predictor["name"], best_predictor["speedup_vs_target"]["value"]),
            "best_sequential": (best_sequential["name"], best_sequential["speedup_vs_target"]["value"]),
            "oracle": oracle["speedup_vs_target"]["value"],
        })

    lines = ["# Draft/target scale pairs (replayed)", "",
             f"Text: `{args.trace}` (greedy, so identical for every draft); target-only timings from "
             f"`{args.target_only}`. Each draft's draft_ms_per_token is the fitted value scaled by its "
             "measured latency ratio (assumed, not recorded live). Speeds are relative to the target alone.",
             *([f"Pre-draft overlap and overhead: measured with `{args.reference_draft}` on "
                f"`{args.predraft_trace}` and assumed for every draft."] if args.predraft_trace else []), "",
             "| draft | layers | training steps | MT-Bench agreement | latency / target | draft ms/token "
             "| best plain (draft_len, speed) | best predictor, pre-drafting | best predictor, no pre-draft | oracle |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| `{row['draft']}` | {row['layers']} | {row['steps']} | {row['agreement']:.3f} | "
                     f"{row['latency_ratio']:.2f} | {row['draft_ms_per_token']:.2f} | "
                     f"{row['best_plain'][0]}, {row['best_plain'][1]:.2f} | "
                     f"`{row['best_predictor'][0]}` {row['best_predictor'][1]:.2f} | "
                     f"`{row['best_sequential'][0]}` {row['best_sequential'][1]:.2f} | {row['oracle']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale-pairs.md").write_text("\n".join(lines) + "\n")
    (args.out / "scale-pairs.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


def _predraft_assumptions(args) -> list[str]:
    """Return ``--assume`` arguments with the overlap and overhead fitted on the shipped pair's traces."""
    import pyarrow as pa

    from bpsim.latency import fit_from_table

    tables = [read_trace(path).replace_schema_metadata(None)
              for path in (args.trace, args.target_only, args.predraft_trace)]
    model = fit_from_table(pa.concat_tables(tables, promote_options="permissive"))
    print(f"pre-draft overlap {model.predraft_overlap:.3f}, overhead {model.predraft_overhead_ms:.3f} ms, "
          f"measured with {args.reference_draft}")
    return ["--assume", f"predraft_overlap={model.predraft_overlap}",
            "--assume", f"predraft_overhead_ms={model.predraft_overhead_ms}"]


def _fitted_draft_ms(profile: Path, target_only: Path, folder: Path) -> float:
    """Return the draft_ms_per_token that replay fits from the trace next to ``profile``."""
    probe = folder / "probe"
    bpsim("replay", str(profile), str(target_only), "--device", "cpu", "--draft-lens", "1", "--out", str(probe))
    return json.loads((probe / "replay.json").read_text())["latency"]["draft_ms_per_token"]


if __name__ == "__main__":
    main()
