"""``bpsim bench``: measure branch-predicted decoding against the policies other engines use.

Policies, all run on the same prompts, interleaved in one run with the policy order rotated
per prompt and repeat, so that a slow spell of the machine falls on every policy alike:

- ``target``: the target alone;
- ``plain:draft_len=N``: speculative decoding with the best plain draft_len, given with
  ``--plain-draft-len`` or taken from the exported predictor's held-out replay;
- ``pearl:draft_len=N``: pre-drafting that always assumes every draft is accepted (PEARL's
  post-verify style: a static all-accepted predictor);
- ``plus2-minus1``: the +2/-1 draft-length heuristic of transformers' assisted generation,
  without pre-drafting;
- ``branch:<predictor>``: branch-predicted decoding with the exported predictor;
- ``exhaustive:width=W+<predictor>`` with ``--exhaustive W``.

Speed is output tokens per second of decoding (the sum of round_ms; the prompt pass is left
out, as the replay simulator leaves it out). Intervals come from bootstrap resamples of whole
prompts, and the ratios pair each resample's policies on the same prompts. The simulator's
prediction replays each policy on the acceptance profile of the target's own outputs to these
prompts, with a latency model fitted to this run's traces. Its error therefore measures the
simulator on exactly the requests it claims to model.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bpsim.commands.decode import (RequestSummary, add_model_arguments, branch_config, check_max_new_tokens,
                                   load_models, load_predictor, load_prompts, run_metadata, sampling_config,
                                   select_suite)
from bpsim.errors import BpsimError
from bpsim.jsonsafe import json_safe

logger = logging.getLogger(__name__)

DEFAULT_PLAIN_DRAFT_LEN = 4  # when neither --plain-draft-len nor the exported replay names a plain draft_len >= 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure target-only, plain, PEARL-style, +2/-1 and branch-predicted decoding side by side",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--suite", required=True, help="prompt suite: mt-bench, humaneval or a .jsonl file")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of the suite")
    parser.add_argument("--skip", type=int, default=0,
                        help="skip the first N prompts of the suite, e.g. those the predictor was fitted on (default 0)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every policy on every prompt (default 1)")
    add_model_arguments(parser)
    parser.add_argument("--plain-draft-len", type=int, default=None,
                        help="draft_len of plain speculative decoding and of the PEARL-style and +2/-1 policies "
                             "(default: best_plain_draft_len of the exported predictor's held-out replay)")
    parser.add_argument("--heuristic-max-draft-len", type=int, default=None,
                        help="cap of the +2/-1 heuristic's draft_len (default: the exported max_draft_len, "
                             "at least the plain draft_len)")
    parser.add_argument("--exhaustive", type=int, default=None, metavar="W",
                        help="also run the exported predictor pre-drafting W branch points at once (0 = all)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs of every policy on the first prompt before measuring (default 1)")
    parser.add_argument("--no-probe", action="store_true",
                        help="skip the check that two threads overlap on this CPU")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of prompts (default 1000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for bench.json, bench.md and one trace per policy under traces/ "
                             "(default: traces only, in a new temporary folder)")
    parser.add_argument("--force", action="store_true", help="overwrite bench.json, bench.md and the traces already in --out")
    parser.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------
# Policies


@dataclass
class BenchPolicy:
    """One decoding policy of the bench and the decoder that runs it."""

    name: str
    kind: str  # target, plain, pearl, plus2-minus1, branch or exhaustive
    decoder: object
    predictor_config: dict | None = None
    first_draft_len: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def predrafts(self) -> bool:
        if self.kind == "branch":
            return self.settings["branch"]["predraft"]
        return self.kind in ("pearl", "exhaustive")

    def close(self) -> None:
        self.decoder.close()


def build_policies(pair, exported, predictor_factory: Callable[[], object], *, plain_draft_len: int,
                   heuristic_max_draft_len: int, max_new_tokens: int, sampling, branch, exhaustive: int | None
                   ) -> list[BenchPolicy]:
    """Build every policy's decoder on ``pair``; ``predictor_factory`` returns a fresh exported predictor."""
    import dataclasses

    from bpsim.branch import BranchConfig, BranchPredictedDecoder, PlusTwoMinusOne
    from bpsim.decoding import DecodeConfig, SpeculativeDecoder
    from bpsim.predictors.static import StaticPredictor
    from bpsim.replay import for_mode, predictor_label

    def config(draft_len: int) -> DecodeConfig:
        return DecodeConfig(draft_len=draft_len, max_new_tokens=max_new_tokens, sampling=sampling)

    n = plain_draft_len
    pearl = StaticPredictor("all", draft_len=n)
    # PEARL-style and exhaustive policies pre-draft whatever the exported mode is.
    predrafting = dataclasses.replace(branch, predraft=True)
    rule = PlusTwoMinusOne(n, heuristic_max_draft_len)
    predictor = predictor_factory()
    label = predictor_label(predictor)
    policies = [
        BenchPolicy("target", "target", SpeculativeDecoder.from_pair(pair, config(0))),
        BenchPolicy(f"plain:draft_len={n}", "plain", SpeculativeDecoder.from_pair(pair, config(n)), first_draft_len=n),
        BenchPolicy(f"pearl:draft_len={n}", "pearl",
                    BranchPredictedDecoder.from_pair(pair, config(n), predictor=pearl,
                                                     branch=dataclasses.replace(predrafting, width=1)),
                    pearl.to_config(), n, {"branch": dataclasses.replace(predrafting, width=1).to_dict()}),
        BenchPolicy("plus2-minus1", "plus2-minus1",
                    BranchPredictedDecoder.from_pair(pair, config(n), branch=BranchConfig(predraft=False),
                                                     draft_len_rule=rule),
                    None, n, {"rule": rule.to_dict()}),
        BenchPolicy(f"branch:{label}", "branch",
                    BranchPredictedDecoder.from_pair(pair, config(exported.first_draft_len), predictor=predictor,
                                                     branch=branch),
                    exported.predictor_config, exported.first_draft_len, {"branch": branch.to_dict()}),
    ]
    if exhaustive is not None:
        wide = dataclasses.replace(predrafting, width=exhaustive)
        policies.append(BenchPolicy(
            f"exhaustive:width={exhaustive or 'all'}+{label}", "exhaustive",
            BranchPredictedDecoder.from_pair(pair, config(exported.first_draft_len),
                                             predictor=for_mode(predictor_factory(), True), branch=wide),
            exported.predictor_config, exported.first_draft_len, {"branch": wide.to_dict()}))
    return policies


def rotated(policies: list, shift: int) -> list:
    """Return ``policies`` rotated left by ``shift``, so each prompt starts with another policy."""
    shift %= len(policies)
    return policies[shift:] + policies[:shift]


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Run:
    """One request of one policy."""

    policy: str
    prompt_index: int
    repeat: int
    tokens: tuple[int, ...]
    summary: RequestSummary
    rounds: tuple = ()


def run_policies(policies: list[BenchPolicy], prompts: list[tuple[str, list[int]]], *, repeats: int, sampling,
                 device, writers: dict | None = None, warmup: int = 1, progress: bool = False) -> list[Run]:
    """Run every policy on every prompt ``repeats`` times, interleaved, and return the runs in order.

    Each finished request is handed to its policy's trace writer at once, so an interrupted
    bench keeps every request that finished.
    """
    from bpsim.sampling import request_generator

    def generate(policy: BenchPolicy, index: int, ids: list[int]):
        generator = None if sampling.greedy else request_generator(sampling.seed, index, device)
        return policy.decoder.generate(ids, generator)

    for _ in range(warmup):
        for policy in policies:
            generate(policy, 0, prompts[0][1])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=repeats * len(prompts) * len(policies), desc="bench", unit="request", file=sys.stderr)
    runs = []
    try:
        for repeat in range(repeats):
            for index, (prompt_id, ids) in enumerate(prompts):
                for policy in rotated(policies, index + repeat):
                    generation = generate(policy, index, ids)
                    runs.append(Run(policy.name, index, repeat, generation.tokens, RequestSummary.of(generation),
                                    generation.rounds))
                    if writers is not None:
                        writers[policy.name].add_request(repeat * len(prompts) + index, prompt_id,
                                                         list(generation.rounds))
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()
    return runs


# ---------------------------------------------------------------------------------------------
# Statistics


def _interval(values: np.ndarray, confidence: float) -> list[float]:
    """Return ``[point, low, high]`` from row 0 (the full sample) and the bootstrap rows."""
    point = float(values[0])
    finite = values[1:][np.isfinite(values[1:])]
    if not math.isfinite(point) or len(finite) == 0:
        return [point, point, point]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return [point, float(low), float(high)]


def summarise(runs: list[Run], policies: list[BenchPolicy], prompts: int, *, bootstrap: int, confidence: float,
              seed: int = 0) -> list[dict]:
    """Return per-policy tokens/s and ratios with bootstrap intervals over prompts, in policy order."""
    names = [policy.name for policy in policies]
    tokens = np.zeros((len(names), prompts))
    time_ms = np.zeros((len(names), prompts))
    totals = {name: {"rounds": 0, "hits": 0, "predrafts": 0, "accepted": 0.0, "drafted_rounds": 0, "requests": 0}
              for name in names}
    for run in runs:
        row = names.index(run.policy)
        tokens[row, run.prompt_index] += run.summary.tokens
        time_ms[row, run.prompt_index] += run.summary.decode_ms
        total = totals[run.policy]
        total["rounds"] += run.summary.rounds
        total["hits"] += run.summary.hits
        total["predrafts"] += run.summary.predrafts
        total["requests"] += 1
        drafted = [record for record in run.rounds if record.draft_len > 0]
        total["accepted"] += sum(record.accepted for record in drafted)
        total["drafted_rounds"] += len(drafted)

    generator = np.random.default_rng(seed)
    weights = generator.multinomial(prompts, np.full(prompts, 1.0 / prompts), size=bootstrap).astype(float)
    weights = np.vstack([np.ones(prompts), weights])  # (1 + bootstrap, prompts); row 0 is the full sample
    with np.errstate(invalid="ignore", divide="ignore"):
        speed = 1000.0 * (weights @ tokens.T) / (weights @ time_ms.T)  # (1 + bootstrap, policies)
    target = names.index("target")
    plain = next(i for i, policy in enumerate(policies) if policy.kind == "plain")
    results = []
    for i, policy in enumerate(policies):
        total = totals[policy.name]
        results.append({
            "name": policy.name, "kind": policy.kind, "requests": total["requests"],
            "tokens": int(tokens[i].sum()), "decode_s": float(time_ms[i].sum() / 1000.0), "rounds": total["rounds"],
            "tokens_per_s": _interval(speed[:, i], confidence),
            "vs_target": _interval(speed[:, i] / speed[:, target], confidence),
            "vs_best_plain": _interval(speed[:, i] / speed[:, plain], confidence),
            "mean_accepted": total["accepted"] / total["drafted_rounds"] if total["drafted_rounds"] else None,
            "hit_rate": total["hits"] / total["predrafts"] if total["predrafts"] else None,
            "hits": total["hits"], "predrafts": total["predrafts"],
            "predictor": policy.predictor_config, "first_draft_len": policy.first_draft_len, **policy.settings,
        })
    return results


def lossless_check(runs: list[Run]) -> dict:
    """Compare every greedy run's output with the target-only output of the same prompt and repeat."""
    reference = {(run.prompt_index, run.repeat): run.tokens for run in runs if run.policy == "target"}
    compared = differing = 0
    examples = []
    for run in runs:
        expected = reference.get((run.prompt_index, run.repeat))
        if run.policy == "target" or expected is None:
            continue
        compared += 1
        if run.tokens != expected:
            differing += 1
            position = next((i for i, (a, b) in enumerate(zip(run.tokens, expected)) if a != b),
                            min(len(run.tokens), len(expected)))
            examples.append({"policy": run.policy, "prompt_index": run.prompt_index, "repeat": run.repeat,
                             "first_difference": position})
    return {"compared": compared, "differing": differing, "examples": examples[:10]}


# ---------------------------------------------------------------------------------------------
# The simulator's prediction


def rounds_table(runs: list[Run], policy: str | None = None):
    """Return the trace table (``bpsim.traces.SCHEMA``) of the runs, of one policy or all, one request per run."""
    import pyarrow as pa

    from bpsim.traces import SCHEMA

    rows = []
    for request, run in enumerate(runs):
        if policy is not None and run.policy != policy:
            continue
        rows.extend({"run_id": "bench", "request_id": request, "prompt_id": str(run.prompt_index), **asdict(record)}
                    for record in run.rounds)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def acceptance_table(pair, prompts: list[tuple[str, list[int]]], outputs: dict[int, tuple[int, ...]], sampling,
                     latency):
    """Profile the target-only output of every prompt with both models and return it as an AcceptanceTable.

    Greedy profiles are exact; under sampling the verdicts become acceptance probabilities and
    the replay is approximate.
    """
    from bpsim.profile import profile_request
    from bpsim.replay_data import table_from_outcomes

    match, second, max_prob, entropy, prompt_lens, labels = [], [], [], [], [], []
    for index, (prompt_id, ids) in enumerate(prompts):
        tokens = list(outputs[index])
        profile = profile_request(pair, ids, tokens, sampling.temperature, sampling.top_k, sampling.top_p)
        match.append(profile["match"] if sampling.greedy else profile["accept_prob"])
        second.append(profile["second_match"])
        max_prob.append(profile["draft_max_prob"])
        entropy.append(profile["draft_entropy"])
        prompt_lens.append(len(ids))
        labels.append(prompt_id)
    approximation = "" if sampling.greedy else ("sampled outputs: verdicts drawn from acceptance probabilities along "
                                                "the target-only output")
    return table_from_outcomes(match, second, prompt_len=prompt_lens, draft_max_prob=max_prob, draft_entropy=entropy,
                               labels=labels, approximation=approximation, latency=latency)


def simulate(pair, prompts, runs: list[Run], policies: list[BenchPolicy], exported, predictor_factory, *,
             sampling, exhaustive: int | None, bootstrap: int, confidence: float) -> dict:
    """Replay every policy the simulator models on these prompts; return predicted speedups and the oracle."""
    from bpsim.latency import fit_from_table
    from bpsim.predictors.static import StaticPredictor
    from bpsim.replay import for_mode, replay

    outputs = {run.prompt_index: run.tokens for run in runs if run.policy == "target" and run.repeat == 0}
    latency = fit_from_table(rounds_table(runs))
    table = acceptance_table(pair, prompts, outputs, sampling, latency)
    plain = next(policy for policy in policies if policy.kind == "plain")
    n = plain.first_draft_len
    common = {"latency": latency, "draft_lens": [n], "device": "cpu", "bootstrap": bootstrap,
              "confidence": confidence}
    branch_policy = next(policy for policy in policies if policy.kind == "branch")
    branch_predrafts = branch_policy.settings["branch"]["predraft"]
    rule = next((policy.settings["rule"] for policy in policies if policy.kind == "plus2-minus1"), None)
    branch = replay(table, [predictor_factory()], first_draft_len=exported.first_draft_len,
                    sequential=not branch_predrafts,
                    heuristic=(rule["first_draft_len"], rule["max_draft_len"]) if rule else None, **common)
    # The exhaustive policy always pre-drafts, so its predictor chooses lengths for that mode.
    wide = (replay(table, [for_mode(predictor_factory(), True)], first_draft_len=exported.first_draft_len,
                   exhaustive_widths=[exhaustive], oracle=False, **common) if exhaustive is not None else None)
    pearl = replay(table, [StaticPredictor("all", draft_len=n)], first_draft_len=n, oracle=False, **common)
    predicted = {}
    for policy in policies:
        if policy.kind in ("target", "plain"):
            source = branch.policy("target" if policy.kind == "target" else f"plain:draft_len={n}")
        elif policy.kind == "branch":
            source = next(p for p in branch.policies if p.kind == ("predicted" if branch_predrafts else "sequential"))
        elif policy.kind == "exhaustive":
            source = next(p for p in wide.policies if p.kind == "exhaustive")
        elif policy.kind == "pearl":
            source = next(p for p in pearl.policies if p.kind == "predicted")
        elif policy.kind == "plus2-minus1":
            source = next(p for p in branch.policies if p.kind == "heuristic")
        else:
            continue
        predicted[policy.name] = {"replayed_as": source.name, "tokens_per_s": source.tokens_per_s.value,
                                  "vs_target": asdict(source.speedup_vs_target),
                                  "hit_rate": source.hit_rate.value if source.hit_rate else None}
    oracle = next(p for p in branch.policies if p.kind == "oracle")
    return {"mode": "exact" if table.exact else "approximate", "approximation": table.approximation,
            "latency": latency.to_dict(), "latency_description": latency.describe(), "predicted": predicted,
            "oracle": {"name": oracle.name, "tokens_per_s": asdict(oracle.tokens_per_s),
                       "vs_target": asdict(oracle.speedup_vs_target)},
            "warnings": branch.warnings + pearl.warnings + (wide.warnings if wide is not None else [])}


def attach_predictions(results: list[dict], simulation: dict | None) -> None:
    """Put the simulator's predicted speedup and its error in percent next to each measured one."""
    for result in results:
        prediction = (simulation or {}).get("predicted", {}).get(result["name"])
        result["simulated"] = prediction
        measured = result["vs_target"][0]
        if prediction is None or not measured or not math.isfinite(measured):
            result["simulation_error_percent"] = None
            continue
        result["simulation_error_percent"] = 100.0 * (prediction["vs_target"]["value"] - measured) / measured


# ---------------------------------------------------------------------------------------------
# Reports


def _format(interval, digits: int = 2) -> str:
    if interval is None or interval[0] is None or not math.isfinite(interval[0]):
        return "-"
    return f"{interval[0]:.{digits}f} [{interval[1]:.{digits}f}, {interval[2]:.{digits}f}]"


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["policy", "tokens/s", "vs target", "vs best plain", "hit rate", "accepted/round", "simulated vs target",
              "simulator error"]
    rows = []
    for result in results:
        simulated = result.get("simulated")
        error = result.get("simulation_error_percent")
        rows.append([
            result["name"], _format(result["tokens_per_s"], 1), _format(result["vs_target"]),
            _format(result["vs_best_plain"]),
            f"{result['hit_rate']:.0%} ({result['hits']}/{result['predrafts']})" if result["hit_rate"] is not None
            else "-",
            f"{result['mean_accepted']:.2f}" if result["mean_accepted"] is not None else "-",
            f"{simulated['vs_target']['value']:.2f}" if simulated else "-",
            f"{error:+.1f}%" if error is not None else "-",
        ])
    return header, rows


def format_text(report: dict) -> str:
    header, rows = table_rows(report["policies"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [describe_run(report), ""]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    lines += [""] + describe_notes(report)
    return "\n".join(lines)


def describe_run(report: dict) -> str:
    run = report["run"]
    first = f" after the first {run['skip']}" if run.get("skip") else ""
    return (f"bench: {run['prompts']} prompts from {run['suite']}{first} x {run['repeats']} repeat(s), max_new_tokens "
            f"{run['max_new_tokens']}, {run['sampling']['mode']}, {run['device']}; tokens/s of decoding "
            f"(prefill excluded) with {report['confidence']:.0%} bootstrap intervals over prompts")


def describe_notes(report: dict) -> list[str]:
    lines = []
    simulation = report.get("simulation")
    if simulation:
        oracle = simulation["oracle"]
        lines.append(f"oracle ceiling (replay, {simulation['mode']}): {oracle['tokens_per_s']['value']:.1f} tokens/s, "
                     f"{oracle['vs_target']['value']:.2f}x target-only")
        lines += [f"simulator warning: {warning}" for warning in simulation["warnings"]]
    elif report.get("simulation_error"):
        lines.append(f"no simulator prediction: {report['simulation_error']}")
    check = report.get("lossless")
    if check and report["run"]["sampling"]["mode"] == "greedy":
        lines.append(f"greedy outputs identical to target-only: {check['compared'] - check['differing']} of "
                     f"{check['compared']} requests")
    probe = report.get("thread_probe")
    if probe:
        split = probe.get("sequential_split_ms")
        lines.append(f"thread overlap probe (same draft and verify work): sequential on {probe.get('threads')} "
                     f"thread(s) {probe['sequential_ms'] / 1000:.2f} s"
                     + (f", sequential on {probe['threads_per_model'] or probe.get('threads')} thread(s) "
                        f"{split / 1000:.2f} s" if split else "")
                     + f", two threads {probe['concurrent_ms'] / 1000:.2f} s ({probe['speedup']:.2f}x the first)")
    lines.append(f"sequential policies ran on {report['run']['torch_threads']} torch thread(s); pre-drafting policies "
                 f"on {report['run']['threads_per_model'] or report['run']['torch_threads']} per model")
    return lines


def format_markdown(report: dict) -> str:
    header, rows = table_rows(report["policies"])
    lines = ["# Bench", "", describe_run(report), "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"`{row[0]}`" if i == 0 else cell for i, cell in enumerate(row)) + " |"
              for row in rows]
    lines += [""] + [f"- {line}" for line in describe_notes(report)]
    if report.get("simulation"):
        lines += ["", "## Latency model of the simulation", "", "```", report["simulation"]["latency_description"],
                  "```"]
    options = []
    for key, value in report["arguments"].items():
        if value is None or value is False or key in ("command", "verbose"):
            continue
        options.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}"))
    arguments = " ".join(options)
    lines += ["", "## Arguments", "", "```", f"bpsim bench {arguments}", "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The command


def plain_draft_len_of(args, exported) -> tuple[int, str]:
    """Return the plain draft_len and where it came from."""
    if args.plain_draft_len is not None:
        if args.plain_draft_len < 1:
            raise BpsimError(f"--plain-draft-len must be at least 1, got {args.plain_draft_len}")
        return args.plain_draft_len, "given"
    best = int(exported.expected.get("best_plain_draft_len") or 0)
    if best >= 1:
        return best, "best plain draft_len of the exported predictor's held-out replay"
    return DEFAULT_PLAIN_DRAFT_LEN, (f"default: the exported replay found target-only decoding fastest, so plain "
                                     f"speculative decoding uses draft_len {DEFAULT_PLAIN_DRAFT_LEN}")


def thread_probe(pair, ids: list[int], draft_len: int, threads_per_model: int | None) -> dict:
    """Time one drafting step and one verification after ``ids``, sequentially and on two threads."""
    import torch

    from bpsim.decoding import CachedModel, draft, prefill, rollback, verify
    from bpsim.predraft import probe_thread_overlap
    from bpsim.sampling import SamplingConfig

    target = CachedModel(pair.target.model, pair.vocab_size)
    drafter = CachedModel(pair.draft.model, pair.vocab_size)
    with torch.inference_mode():
        prefill(target, ids)
        prefill(drafter, ids)
    tokens = torch.tensor(ids[-draft_len:] if len(ids) >= draft_len else [ids[-1]] * draft_len, device=pair.device)

    def draft_job():
        draft(drafter, ids, draft_len, SamplingConfig())
        rollback(drafter, len(ids) - 1)

    def verify_job():
        verify(target, ids, tokens)
        rollback(target, len(ids) - 1)

    return probe_thread_overlap(draft_job, verify_job, repeats=3, threads_per_model=threads_per_model).to_dict()


def trace_name(policy: str) -> str:
    """Return the trace file name of a policy, with every character but letters, digits, '.', '_' and '-' as '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", policy) + ".parquet"


def _open_writers(folder: Path, policies: list[BenchPolicy], metadata: dict, overwrite: bool) -> dict:
    from bpsim.traces import TraceError, TraceWriter

    writers = {}
    for policy in policies:
        path = folder / trace_name(policy.name)
        policy_metadata = {**metadata, "policy": {"name": policy.name, "kind": policy.kind,
                                                  "predictor": policy.predictor_config,
                                                  "first_draft_len": policy.first_draft_len, **policy.settings}}
        try:
            writers[policy.name] = TraceWriter(path, policy_metadata, overwrite=overwrite)
        except TraceError as error:
            raise BpsimError(str(error)) from error
    return writers


def run(args) -> int:
    from bpsim.atomic import write_text
    from bpsim.export import load_exported

    check_max_new_tokens(args.max_new_tokens)
    if args.repeats < 1:
        raise BpsimError(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 0:
        raise BpsimError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.exhaustive is not None and (args.exhaustive < 0 or args.exhaustive == 1):
        raise BpsimError(f"--exhaustive takes a branch count >= 2, or 0 for all, got {args.exhaustive} "
                         "(one branch point is the branch-predicted policy itself)")
    if not 0 < args.confidence < 1:
        raise BpsimError(f"--confidence must lie in (0, 1), got {args.confidence}")
    if args.bootstrap < 1:
        raise BpsimError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    exported = load_exported(args.config)
    sampling = sampling_config(args)
    branch = branch_config(args, exported)
    selected = select_suite(args)
    plain_len, plain_source = plain_draft_len_of(args, exported)
    heuristic_max = args.heuristic_max_draft_len or max(exported.max_draft_len, plain_len)
    if heuristic_max < plain_len:
        raise BpsimError(f"--heuristic-max-draft-len {heuristic_max} is below the plain draft_len {plain_len}; "
                         "raise it or lower --plain-draft-len")
    if args.out is not None and (args.out / "bench.json").exists() and not args.force:
        raise BpsimError(f"{args.out / 'bench.json'} already exists; pass --force to overwrite it or choose "
                         "another --out")

    pair = load_models(args, exported)
    prompts, suite = load_prompts(args, pair.tokenizer, selected)
    policies = build_policies(pair, exported, lambda: load_predictor(exported, branch.predraft),
                              plain_draft_len=plain_len,
                              heuristic_max_draft_len=heuristic_max, max_new_tokens=args.max_new_tokens,
                              sampling=sampling, branch=branch, exhaustive=args.exhaustive)
    import torch

    traces = (args.out / "traces") if args.out is not None else Path(tempfile.mkdtemp(prefix="bpsim-bench-"))
    metadata = {**run_metadata(pair, sampling, "bench"), "suite": suite, "max_new_tokens": args.max_new_tokens,
                "repeats": args.repeats, "prompt_tokens": dict(prompts)}
    writers = _open_writers(traces, policies, metadata, overwrite=args.force)
    probe = None
    if not args.no_probe and any(getattr(p.decoder, "backend", None) is not None
                                 and p.decoder.backend.name == "thread" for p in policies):
        probe = thread_probe(pair, prompts[0][1], plain_len, branch.threads_per_model)
    print(f"plain draft_len {plain_len} ({plain_source}); traces go to {traces}", file=sys.stderr)
    try:
        runs = run_policies(policies, prompts, repeats=args.repeats, sampling=sampling, device=pair.device,
                            writers=writers, warmup=args.warmup, progress=True)
    except BaseException as error:
        for writer in writers.values():
            writer.close(complete=False)
        stopped = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped by an error"
        print(f"\n{stopped}; the traces of the finished requests are in {traces}", file=sys.stderr)
        raise
    finally:
        for policy in policies:
            policy.close()
    for writer in writers.values():
        writer.close(complete=True)

    results = summarise(runs, policies, len(prompts), bootstrap=args.bootstrap, confidence=args.confidence,
                        seed=args.seed)
    report = {
        "format": "bpsim-bench", "version": 1,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "arguments": {key: value if isinstance(value, (int, float, str, type(None))) else str(value)
                      for key, value in vars(args).items() if key != "run"},
        "confidence": args.confidence, "bootstrap": args.bootstrap, "config_file": str(args.config),
        "run": {**metadata, "prompt_tokens": None, "prompts": len(prompts), "suite": args.suite, "skip": args.skip,
                "plain_draft_len": plain_len, "plain_draft_len_source": plain_source,
                "torch_threads": torch.get_num_threads(), "threads_per_model": branch.threads_per_model,
                "traces": str(traces)},
        "exported_expected": exported.expected, "thread_probe": probe, "lossless": lossless_check(runs),
    }
    try:
        report["simulation"] = simulate(pair, prompts, runs, policies, exported,
                                        lambda: load_predictor(exported, branch.predraft),
                                        sampling=sampling, exhaustive=args.exhaustive, bootstrap=args.bootstrap,
                                        confidence=args.confidence)
    except BpsimError as error:
        logger.warning("the simulator's prediction failed: %s", error)
        report["simulation"], report["simulation_error"] = None, str(error)
    attach_predictions(results, report.get("simulation"))
    report["policies"] = results

    print(format_text(report))
    if args.out is not None:
        write_text(args.out / "bench.json", json.dumps(json_safe(report), indent=1, allow_nan=False, default=str) + "\n")
        write_text(args.out / "bench.md", format_markdown(report))
        print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}; traces in {traces}", file=sys.stderr)
    else:
        print(f"traces in {traces}", file=sys.stderr)
    return 0
