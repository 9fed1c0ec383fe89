"""``bpsim fit TRACES... --out DIR``: fit every family, score every predictor and name the winner.

The output folder contains ``report.md`` with its plots, ``summary.json`` and ``latency.json``.
The summary names the winner by expected speed and stores every predictor's ``to_config()``, so
``bpsim.predictors.predictor_from_config`` can rebuild any of them. ``latency.json`` is the latency
model every score used, fitted on the timings of all traces, ``--latency-traces`` included;
``bpsim replay --latency`` and ``bpsim export`` reuse it.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
from pathlib import Path

import numpy as np

from bpsim import __version__
from bpsim.atomic import atomic_dir
from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)

SUMMARY_VERSION = 1
STRATA = ("suite", "draft_len", "mode")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("fit", help="fit acceptance distributions and predictors to traces and report")
    parser.add_argument("traces", nargs="+", type=Path, help="trace files (.parquet) written by bpsim record")
    parser.add_argument("--out", type=Path, required=True, help="output folder for report.md, plots and summary.json")
    parser.add_argument("--latency-traces", nargs="+", type=Path, default=[], metavar="TRACE",
                        help="traces of the same pair that only time the models; their accepted counts are not "
                             "fitted (e.g. a run that pre-drafts, which times the overlap of pre-drafting)")
    parser.add_argument("--pool", action="store_true", help="fit traces of different model pairs together")
    parser.add_argument("--stratify", default="", help=f"comma-separated keys to also fit per stratum: {', '.join(STRATA)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split and the bootstrap (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.3,
                        help="share of requests held out for scoring (default 0.3)")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap resamples of requests for the intervals (default 200; 0 for none)")
    parser.set_defaults(run=run)


def parse_strata(text: str) -> tuple[str, ...]:
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    unknown = [key for key in keys if key not in STRATA]
    if unknown:
        raise BpsimError(f"unknown --stratify key {', '.join(unknown)}; choose from {', '.join(STRATA)}")
    return keys


def load_traces(paths: list[Path], pool: bool, latency_paths: list[Path] = ()):
    """Read and validate the traces; reject traces of different model pairs unless ``pool``.

    Return ``(rounds, pairs, latency)``: the rounds of ``paths``, the model pairs, and the latency
    model fitted on the timings of ``paths`` and ``latency_paths`` together.
    """
    import pyarrow as pa

    from bpsim.fitting import Rounds, model_pair
    from bpsim.latency import fit_from_table
    from bpsim.traces import read_trace, trace_metadata

    seen: dict[Path, str] = {}
    for path in [*paths, *latency_paths]:
        key = Path(path).resolve()
        if key in seen:
            raise BpsimError(f"trace {path} is given twice (also as {seen[key]}); pass each trace once, or its "
                             "requests would count twice and leak into the held-out split")
        seen[key] = str(path)
    tables = [(str(path), read_trace(path)) for path in paths]
    timing = [(str(path), read_trace(path)) for path in latency_paths]
    for kind, group in (("trace", tables), ("latency trace", timing)):
        for source, table in group:
            if table.num_rows == 0:
                raise BpsimError(f"{kind} {source} contains no rounds; record at least one request before fitting it")
            metadata = trace_metadata(table)
            if metadata.get("complete") is False:
                suite = metadata.get("suite")
                prompts = suite.get("prompts") if isinstance(suite, dict) else None
                logger.warning("%s %s is incomplete: its run stopped after %s of %s requests; the fit uses what it "
                               "holds", kind, source, metadata.get("requests", "?"), prompts or "?")
    pairs = {}
    targets_only = {}
    for source, table in tables:
        metadata = trace_metadata(table)
        if metadata.get("draft") is None:
            # A target-only trace only informs the latency model, so it needs the same target alone.
            targets_only.setdefault(model_pair({"target": metadata.get("target")}).split(" -> ")[0], []).append(source)
        else:
            pairs.setdefault(model_pair(metadata), []).append(source)
    targets = {pair.split(" -> ")[0] for pair in pairs}
    for target, sources in targets_only.items():
        if pairs and target not in targets and not pool:
            raise BpsimError(f"target-only trace {', '.join(sources)} was recorded with target {target}, but the "
                             f"speculative traces use {', '.join(sorted(targets))}; drop it or pass --pool")
    if not pairs:
        raise BpsimError(f"no speculative trace among {', '.join(map(str, paths))}: target-only traces have no "
                         "accepted counts to fit; add a trace recorded with --draft-len above 0")
    if len(pairs) > 1 and not pool:
        listing = "; ".join(f"{pair} in {', '.join(sources)}" for pair, sources in pairs.items())
        raise BpsimError(f"the traces come from different model pairs ({listing}); fit them separately, "
                         "or pass --pool to fit them together")
    for source, table in timing:
        metadata = trace_metadata(table)
        pair = model_pair(metadata)
        if metadata.get("draft") is None:
            known = pair.split(" -> ")[0] in targets  # a target-only trace needs the same target
        else:
            known = pair in pairs
        if not known:
            raise BpsimError(f"latency trace {source} was recorded with {pair}, but the traces use "
                             f"{', '.join(sorted(pairs))}; time the same pair")
    everything = [table.replace_schema_metadata(None) for _, table in tables + timing]
    latency = fit_from_table(pa.concat_tables(everything, promote_options="permissive"))
    return Rounds.from_tables(tables), sorted(pairs), latency


def drop_target_only(rounds):
    """Keep the rounds of speculative traces; target-only traces only inform the latency model."""
    return rounds.subset(np.array([not pair.endswith("-> None") for pair in rounds.pair], dtype=bool))


def strata_masks(rounds, keys: tuple[str, ...]):
    """Yield ``(label, mask)`` for every combination of the stratification keys present in ``rounds``."""
    columns = {"suite": rounds.suite, "draft_len": rounds.draft_len, "mode": rounds.mode}
    values = [sorted(set(columns[key].tolist())) for key in keys]
    for combination in itertools.product(*values):
        mask = np.ones(len(rounds), dtype=bool)
        for key, value in zip(keys, combination):
            mask &= columns[key] == value
        if mask.any():
            yield ", ".join(f"{key}={value}" for key, value in zip(keys, combination)), mask


def fit_traces(paths: list[Path], out: Path, pool: bool = False, stratify: tuple[str, ...] = (), seed: int = 0,
               test_fraction: float = 0.3, resamples: int = 200, latency_paths: list[Path] = ()) -> dict:
    """Fit and score every family on the traces, write the report and summary into ``out``; return the summary."""
    from bpsim.fitting import FitError, split_by_request
    from bpsim.models import file_sha256
    from bpsim.latency import LatencyModelError
    from bpsim.report import write_report
    from bpsim.scoring import evaluate

    # Target-only and latency traces add timings to the latency model and nothing else.
    rounds, pairs, latency = load_traces(paths, pool, latency_paths)
    logger.info("%s", latency.describe())
    rounds = drop_target_only(rounds)
    train, test, held_out = split_by_request(rounds, test_fraction, seed)
    overall = evaluate(train, test, held_out, "all rounds", resamples, seed, latency=latency)
    logger.info("winner by expected speed: %s (%.4f tokens/ms)", overall.winner.name, overall.winner.speed)
    sections = [(overall, train)]
    strata, skipped = {}, {}
    train_strata, test_strata = dict(strata_masks(train, stratify)), dict(strata_masks(test, stratify))
    for label, _ in strata_masks(rounds, stratify) if stratify else ():
        train_mask, test_mask = train_strata.get(label), test_strata.get(label)
        if train_mask is None or test_mask is None:
            skipped[label] = "no rounds in the train or the test split"
            continue
        try:
            evaluation = evaluate(train.subset(train_mask), test.subset(test_mask), held_out, label, resamples, seed,
                                  latency=latency)
        except (FitError, LatencyModelError) as error:
            skipped[label] = str(error)
            logger.warning("stratum %s skipped: %s", label, error)
            continue
        strata[label] = evaluation
        sections.append((evaluation, train.subset(train_mask)))

    summary = {
        "version": SUMMARY_VERSION,
        "bpsim_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "traces": [str(path) for path in paths],
        "latency_traces": [str(path) for path in latency_paths],
        "trace_sha256": {str(path): file_sha256(Path(path)) for path in [*paths, *latency_paths]},
        "latency": latency.to_dict(),
        "model_pairs": pairs,
        "pooled": len(pairs) > 1,
        "seed": seed,
        "test_fraction": test_fraction,
        "bootstrap_resamples": resamples,
        "winner": {"name": overall.winner.name, "config": overall.winner.config, "speed": overall.winner.speed},
        "overall": overall.summary(),
        "strata": {label: evaluation.summary() for label, evaluation in strata.items()},
        "skipped_strata": skipped,
    }
    title = [f"Traces: {', '.join(f'`{path}`' for path in paths)}."]
    if latency_paths:
        title.append(f"Latency traces (timings only): {', '.join(f'`{path}`' for path in latency_paths)}.")
    title += [f"Model pairs: {'; '.join(pairs)}.",
             f"Split seed {seed}, {test_fraction:.0%} of requests held out; {resamples} bootstrap resamples."]
    if "draft_len" in stratify:
        title.append("Draft-length strata keep only some rounds of each request, so history predictors see gaps.")
    with atomic_dir(out) as folder:
        write_report(folder, title, sections)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        (folder / "latency.json").write_text(json.dumps(latency.to_dict(), indent=2, allow_nan=False))
    return summary


def run(args) -> int:
    if not 0.0 < args.test_fraction < 1.0:
        raise BpsimError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
    if args.bootstrap < 0:
        raise BpsimError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    summary = fit_traces(args.traces, args.out, args.pool, parse_strata(args.stratify), args.seed,
                         args.test_fraction, args.bootstrap, args.latency_traces)
    winner = summary["winner"]
    print(f"winner: {winner['name']} ({winner['speed']:.4f} tokens/ms expected); report in {args.out / 'report.md'}")
    return 0
