"""Measure replay speed: simulated rounds per second for every predictor family, and for a parameter sweep.

The input is one synthetic trace of ``--requests x --rounds-per-request`` recorded rounds
(default 1000 x 1000, a million rounds) turned into per-position outcomes, so each policy
replays about a million rounds of its own. Reported per policy: simulated rounds, seconds and
rounds per second of ``bpsim.replay.simulate`` over ``--repeats`` runs (median and fastest, after
one warm-up call on a few requests), and for the sweep, configurations x rounds per second. The scalar path (one Python call per lane
per round) is timed on a subset for comparison.

    python analysis/bench_replay.py --device cpu --out docs/replay-benchmark.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bpsim.predictors.distribution import (BetaBinomialPredictor, BetaGeometricPredictor, BinomialPredictor,
                                           CappedGeometricPredictor, EmpiricalPredictor)
from bpsim.predictors.features import HazardGLMPredictor
from bpsim.predictors.history import (ExpAveragePredictor, LastValuePredictor, OneBitPredictor,
                                      PlusTwoMinusOnePredictor, SaturatingCounterPredictor, TwoLevelPredictor)
from bpsim.predictors.static import StaticPredictor
from bpsim.replay import DEFAULT_CPU_THREADS, resolve_device, simulate, simulate_oracle
from bpsim.replay_data import AcceptanceTable, realize, trace_outcomes
from bpsim.latency import fit_from_table
from bpsim.replay_steppers import build_stepper, first_draft_len
from bpsim.synthetic import synthetic_trace
from machine import cpu_model

ACCEPTANCE = 0.7


def family_predictors(latency) -> list:
    """Return one configuration of every family, with parameters of an acceptance rate near ``ACCEPTANCE``."""
    common = {"latency": latency, "max_draft_len": 8}
    counts = {"6": [30, 21, 15, 10, 7, 5, 12]}
    return [
        StaticPredictor("all", draft_len=4),
        LastValuePredictor(draft_len=4),
        PlusTwoMinusOnePredictor(draft_len=4),
        ExpAveragePredictor(alpha=0.3, draft_len=4, length_rule="follow"),
        SaturatingCounterPredictor(bits=2, draft_len=4),
        TwoLevelPredictor(history=2, max_symbol=8, draft_len=4),
        OneBitPredictor(high_draft_len=6, low_draft_len=1),
        BinomialPredictor(p=ACCEPTANCE, **common),
        CappedGeometricPredictor(rate=ACCEPTANCE, **common),
        BetaBinomialPredictor(alpha=7.0, beta=3.0, **common),
        BetaGeometricPredictor(alpha=7.0, beta=3.0, **common),
        EmpiricalPredictor(counts=counts, **common),
        HazardGLMPredictor(coefficients=[-0.5, 2.0, -0.3, -0.05], mean_features=[0.7, 1.4], **common),
    ]


def build_table(requests: int, rounds_per_request: int, seed: int) -> tuple[AcceptanceTable, float]:
    started = time.perf_counter()
    trace = synthetic_trace(requests=requests, rounds_per_request=rounds_per_request, draft_len=(2, 4, 6),
                            acceptance=ACCEPTANCE, confidence_strength=1.0, seed=seed)
    outcomes = trace_outcomes(trace, "synthetic")
    table = AcceptanceTable(
        request_labels=tuple(str(r) for r in outcomes["request_id"]), length=outcomes["length"],
        prompt_len=outcomes["prompt_len"], match_prob=outcomes["match_prob"], second_prob=outcomes["second_prob"],
        draft_max_prob=outcomes["draft_max_prob"], draft_entropy=outcomes["draft_entropy"],
        approximation=outcomes["approximation"], latency=fit_from_table(trace))
    return table, time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_predictors(batch, table, predictors, device, vectorised=True) -> int:
    """Simulate ``predictors`` (one stepper) over ``batch`` and return the simulated rounds."""
    context_stop = int(table.prompt_len.max() + table.length.max()) + 1
    first = np.concatenate([[first_draft_len(p, int(c)) for c in batch.prompt_len.cpu().tolist()] for p in predictors])
    stepper = build_stepper(predictors, batch.rows, device, max_draft_len=8, context_start=0,
                            context_stop=context_stop, vectorised=vectorised)
    totals = simulate(batch, table.latency, len(predictors), stepper=stepper, first_draft_lens=first)
    return int(totals.rounds.sum())


def measure(name: str, configs: int, work, device, repeats: int) -> dict:
    """Time ``work()`` (which returns simulated rounds) ``repeats`` times; report the median and the fastest."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        rounds = work()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    median, best = float(np.median(seconds)), min(seconds)
    print(f"{name:60s} {rounds:10d} rounds  median {median:7.2f} s  {rounds / median:12,.0f} rounds/s", flush=True)
    return {"policy": name, "configs": configs, "rounds": rounds, "seconds": [round(x, 3) for x in seconds],
            "rounds_per_s_median": rounds / median, "rounds_per_s_best": rounds / best}


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpu = cpu_model() or platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1_5_15": load, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="synthetic requests (default 1000)")
    parser.add_argument("--rounds-per-request", type=int, default=1000, help="recorded rounds each (default 1000)")
    parser.add_argument("--sweep", type=int, default=8, help="values per swept parameter; the sweep has N x N configs")
    parser.add_argument("--scalar-requests", type=int, default=20, help="requests for the scalar-path comparison")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=DEFAULT_CPU_THREADS,
                        help=f"torch intra-op threads (default {DEFAULT_CPU_THREADS}, as bpsim replay uses on CPU)")
    parser.add_argument("--compare-threads", type=int, default=2,
                        help="also time last-value on --compare-requests requests with this many threads and "
                             "with --threads (default 2; 0 to skip)")
    parser.add_argument("--compare-requests", type=int, default=100, help="requests for the thread comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "device": str(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine_at_start": machine()}

    table, build_seconds = build_table(args.requests, args.rounds_per_request, args.seed)
    batch = realize(table, samples=1, seed=args.seed, device=device)
    info["input"] = {"recorded_rounds": args.requests * args.rounds_per_request, "requests": table.requests,
                     "tokens": table.tokens, "build_seconds": round(build_seconds, 2)}
    print(f"table: {table.requests} requests, {table.tokens} tokens, built in {build_seconds:.1f} s on {device}")

    # Warm-up on a few requests, so one-time costs (allocator, kernels) stay out of the figures.
    warm = realize(table.subset(range(min(8, table.requests))), device=device)
    for predictor in family_predictors(table.latency):
        run_predictors(warm, table, [predictor], device)
    latency, repeats = table.latency, args.repeats

    plain_lens = list(range(9))
    rows = [measure("target + plain draft_len 1..8", len(plain_lens),
                    lambda: int(simulate(batch, latency, len(plain_lens), draft_lens=plain_lens).rounds.sum()),
                    device, repeats)]
    for predictor in family_predictors(latency):
        rows.append(measure(predictor.family, 1, lambda p=predictor: run_predictors(batch, table, [p], device),
                            device, repeats))
    rows.append(measure("oracle (dynamic programming, draft_len 0..8)", 1,
                        lambda: int(simulate_oracle(batch, latency, 8).rounds.sum()), device, repeats))

    # Sweep: exp-average alpha x fixed draft_len, every configuration over every request at once.
    alphas = np.linspace(0.1, 0.9, args.sweep).round(3).tolist()
    lengths = list(range(1, args.sweep + 1))
    sweep = [ExpAveragePredictor(alpha=a, draft_len=n, max_draft_len=max(8, args.sweep))
             for a in alphas for n in lengths]
    rows.append(measure("sweep: exp-average alpha x draft_len", len(sweep),
                        lambda: run_predictors(batch, table, sweep, device), device, repeats))

    if args.compare_threads:
        part = realize(table.subset(range(min(args.compare_requests, table.requests))), device=device)
        for threads in (args.threads, args.compare_threads):
            torch.set_num_threads(threads)
            rows.append(measure(f"last-value on {part.rows} requests, {threads} thread(s)", 1,
                                lambda: run_predictors(part, table, [LastValuePredictor(draft_len=4)], device),
                                device, repeats))
        torch.set_num_threads(args.threads)

    # The scalar path on a subset, for comparison.
    subset = realize(table.subset(range(min(args.scalar_requests, table.requests))), device=device)
    rows.append(measure(f"last-value, scalar path ({subset.rows} requests)", 1,
                        lambda: run_predictors(subset, table, [LastValuePredictor(draft_len=4)], device,
                                               vectorised=False), device, repeats))

    info["results"] = rows
    info["machine_at_end"] = machine()
    print("\n| policy | configs | simulated rounds (all configs) | seconds per run | rounds/s, median | rounds/s, best |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        runs = ", ".join(f"{x:.2f}" for x in row["seconds"])
        print(f"| {row['policy']} | {row['configs']} | {row['rounds']:,} | {runs} | {row['rounds_per_s_median']:,.0f} | "
              f"{row['rounds_per_s_best']:,.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
