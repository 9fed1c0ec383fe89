"""Measure whether a pre-draft overlaps with verification on this CPU, in worker threads or worker processes.

One work unit is the compute of one pre-drafting round with the built-in model pair (float32,
CPU): one target forward pass over ``--verify-tokens`` tokens (verification) and
``--draft-tokens`` one-token draft forward passes, each feeding the previous argmax (the
pre-draft). Both follow a prefilled prompt, and both KV caches are cropped back after every
unit, so every unit runs at the same context length. Three schedules run the unit:

- sequential: verify, then draft, on one Python thread with torch's default intra-op thread
  count. A decoder without pre-drafting does this.
- threads: the draft on a Python worker thread while the main thread verifies, each model with
  ``--threads-per-model`` intra-op threads. The decoder's ``thread`` pre-draft backend does this.
- processes: the draft in a worker process (multiprocessing, "spawn" start method) that loads
  its own copy of the draft and keeps its own prefilled cache. The main process sends "go" over
  a pipe and verifies while the worker drafts and replies. Each process uses
  ``--threads-per-model`` intra-op threads.

A schedule's time is the median wall time per unit. A concurrent unit ends when both the verify
and the draft are done, and a process unit includes the pipe round trip. The speed ratio is the
sequential time over the schedule's time. Above 1 the concurrent schedule finishes a unit sooner,
so overlap pays. Below 1, contention costs more than the overlap saves: the GIL, shared caches and
memory bandwidth, and fewer intra-op threads per model. Verify and draft are also timed
alone with 1 thread and with the default thread count, which shows what each model loses by
giving up threads. "ideal overlap" is the larger of the two alone times at
``--threads-per-model`` threads, the unit time of a perfect overlap without contention. The
"verify ms" and "draft ms" columns time each part inside its own thread or process, so a part
that is slower than alone shows the contention.

Schedules are interleaved: each of ``--rounds`` rounds runs every schedule and every alone
timing on its share of the ``--repeats`` units, in an order that rotates per round, so a slow
spell of the machine hits all of them alike. Other work on the CPUs still distorts the result,
most of all for rows with several intra-op threads, because an OpenMP team waits for its slowest
thread. Measure on an otherwise idle machine.

    python analysis/overlap_probe.py --repeats 20 --out-json overlap.json --out-md overlap.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.utils import logging as transformers_logging

from bpsim.models import load_pair
from bpsim.prompts import encode_prompt, load_suite
from machine import cpu_model

# Loading the pair takes seconds once its weights are cached, but the first load also
# dequantises the built-in GGUF file (about 15 s on a 2-core CPU, per bpsim.models).
WORKER_START_TIMEOUT_S = 300
WORKER_STOP_TIMEOUT_S = 10


# ---------------------------------------------------------------------------------------------
# The work unit


def prefill(model: torch.nn.Module, ids: list[int]) -> DynamicCache:
    """Feed ``ids`` through ``model`` into a new KV cache and return the cache."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids], dtype=torch.long), cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def verify_unit(model: torch.nn.Module, cache: DynamicCache, tokens: torch.Tensor) -> None:
    """Score ``tokens`` (n,) in one forward pass, then crop the n tokens from the cache."""
    model(input_ids=tokens[None], cache=cache, use_cache=True, logits_to_keep=tokens.shape[0])
    cache.crop(-tokens.shape[0])


def draft_unit(model: torch.nn.Module, cache: DynamicCache, first: torch.Tensor, count: int) -> torch.Tensor:
    """Draft ``count`` greedy tokens after ``first`` (1,), one forward pass each, then crop them from the cache.

    Returns the drafted tokens, (count,).
    """
    feed = first
    tokens = []
    for _ in range(count):
        logits = model(input_ids=feed[None], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        feed = logits.argmax()[None]
        tokens.append(feed)
    cache.crop(-count)
    return torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.long)


def timed_ms(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return 1000 * (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# The draft worker process


def draft_worker(connection, ids: list[int], draft_tokens: int, threads: int, warmup: int) -> None:
    """Load the draft, prefill ``ids[:-1]``, then run one draft unit per "go" message until "stop".

    Replies ("ready", torch threads) once warmed up, ("done", draft ms) after each unit, and
    ("error", traceback) when anything fails.
    """
    try:
        transformers_logging.disable_progress_bar()
        torch.set_num_threads(threads)
        model = load_pair(device="cpu", dtype="float32").draft.model
        first = torch.tensor(ids[-1:], dtype=torch.long)
        with torch.inference_mode():
            cache = prefill(model, ids[:-1])
            for _ in range(warmup):
                draft_unit(model, cache, first, draft_tokens)
            connection.send(("ready", torch.get_num_threads()))
            while connection.recv() == "go":
                connection.send(("done", timed_ms(draft_unit, model, cache, first, draft_tokens)))
    except Exception:
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


class DraftProcess:
    """A spawned worker process that runs one draft unit per ``start()``/``wait()`` pair."""

    def __init__(self, ids: list[int], draft_tokens: int, threads: int, warmup: int):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=draft_worker, args=(child, ids, draft_tokens, threads, warmup),
                                       name="overlap-probe-draft", daemon=True)
        self.process.start()
        child.close()  # so that recv() raises EOFError when the worker exits
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not self.connection.poll(1):
            if not self.process.is_alive():
                raise SystemExit(f"the draft worker process exited with code {self.process.exitcode} before it was ready")
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"the draft worker process was not ready after {WORKER_START_TIMEOUT_S} s")
        self.threads = self._reply("ready")

    def _reply(self, expected: str):
        try:
            kind, value = self.connection.recv()
        except EOFError:
            raise SystemExit(f"the draft worker process exited with code {self.process.exitcode}") from None
        if kind == "error":
            raise SystemExit(f"the draft worker process failed:\n{value}")
        if kind != expected:
            raise SystemExit(f"the draft worker process sent {kind!r} where {expected!r} was expected")
        return value

    def start(self) -> None:
        self.connection.send("go")

    def wait(self) -> float:
        """Wait for the unit started last and return the draft ms measured inside the worker."""
        return self._reply("done")

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(WORKER_STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.connection.close()


# ---------------------------------------------------------------------------------------------
# Schedules


class Probe:
    """Both models with their prefilled caches, and the worker thread and process that draft concurrently."""

    def __init__(self, pair, ids: list[int], args, default_threads: int):
        self.target, self.draft = pair.target.model, pair.draft.model
        self.draft_tokens = args.draft_tokens
        self.threads_per_model = args.threads_per_model
        self.default_threads = default_threads
        self.first = torch.tensor(ids[-1:], dtype=torch.long)
        with torch.inference_mode():
            self.target_cache = prefill(self.target, ids[:-1])
            self.draft_cache = prefill(self.draft, ids[:-1])
            # Verify what a draft round would propose: the pending prompt token, then the draft's own tokens.
            drafts = draft_unit(self.draft, self.draft_cache, self.first, args.verify_tokens - 1)
        self.verify_feed = torch.cat([self.first, drafts])  # (verify_tokens,)
        self.context = self.target_cache.get_seq_length()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap-probe-draft")
        self.process = DraftProcess(ids, args.draft_tokens, args.threads_per_model, args.warmup)
        self.observed_threads = {"worker process": self.process.threads}

    def close(self) -> None:
        self.pool.shutdown()
        self.process.close()

    def check_caches(self) -> None:
        """Raise if a unit left tokens behind, which would make later units see a longer context."""
        lengths = (self.target_cache.get_seq_length(), self.draft_cache.get_seq_length())
        if lengths != (self.context, self.context):
            raise SystemExit(f"cache lengths {lengths} drifted from the prefilled {self.context} tokens")

    def verify(self) -> float:
        return timed_ms(verify_unit, self.target, self.target_cache, self.verify_feed)

    def draft_alone(self) -> float:
        return timed_ms(draft_unit, self.draft, self.draft_cache, self.first, self.draft_tokens)

    def _draft_job(self) -> float:
        # Set the count in the worker thread too, as the decoder's thread backend does on every
        # job, so the draft runs on it whichever thread last changed the setting.
        torch.set_num_threads(self.threads_per_model)
        self.observed_threads["worker thread"] = torch.get_num_threads()
        with torch.inference_mode():
            return self.draft_alone()

    def sequential(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        verify_ms = self.verify()
        draft_ms = self.draft_alone()
        return 1000 * (time.perf_counter() - start), verify_ms, draft_ms

    def threads(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        future = self.pool.submit(self._draft_job)
        verify_ms = self.verify()
        draft_ms = future.result()
        return 1000 * (time.perf_counter() - start), verify_ms, draft_ms

    def processes(self) -> tuple[float, float, float]:
        start = time.perf_counter()
        self.process.start()
        verify_ms = self.verify()
        draft_ms = self.process.wait()
        return 1000 * (time.perf_counter() - start), verify_ms, draft_ms

    def jobs(self) -> dict:
        """Map each timed row to (intra-op threads of the main process, function returning ms per unit).

        A schedule's function returns (unit ms, verify ms, draft ms), an alone timing's only its ms.
        """
        parallel = self.threads_per_model
        jobs = {
            f"sequential ({self.default_threads} threads)": (self.default_threads, self.sequential),
            f"threads ({parallel}+{parallel} threads)": (parallel, self.threads),
            f"processes ({parallel}+{parallel} threads)": (parallel, self.processes),
        }
        for count in sorted({1, self.default_threads, parallel}):
            unit = "thread" if count == 1 else "threads"
            jobs[f"verify alone ({count} {unit})"] = (count, self.verify)
            jobs[f"draft alone ({count} {unit})"] = (count, self.draft_alone)
        return jobs


def units_per_round(repeats: int, rounds: int) -> list[int]:
    """Split ``repeats`` units over ``rounds`` rounds as evenly as possible."""
    return [repeats // rounds + (1 if index < repeats % rounds else 0) for index in range(rounds)]


def run_rounds(probe: Probe, repeats: int, rounds: int, warmup: int) -> dict:
    """Run every job's warm-up, then its share of units in every round; return each job's samples.

    A sample is a (unit ms, verify ms, draft ms) tuple for a schedule and a float for an alone timing.
    """
    jobs = probe.jobs()
    names = list(jobs)
    samples = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            threads, function = jobs[name]
            torch.set_num_threads(threads)
            for _ in range(warmup):
                function()
        for index, count in enumerate(units_per_round(repeats, rounds)):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                threads, function = jobs[name]
                torch.set_num_threads(threads)
                samples[name].extend(function() for _ in range(count))
            probe.check_caches()
            print(f"round {index + 1}/{rounds} done", flush=True)
    torch.set_num_threads(probe.default_threads)
    return samples


# ---------------------------------------------------------------------------------------------
# Report


def summarise(samples: dict, threads_per_model: int) -> list[dict]:
    """Reduce the samples to one row per schedule, per alone timing and for the ideal overlap, with medians in ms."""
    rows = []
    for name, values in samples.items():
        if isinstance(values[0], tuple):
            units, verifies, drafts = zip(*values)
            rows.append({"schedule": name, "ms_per_unit": statistics.median(units),
                         "verify_ms": statistics.median(verifies), "draft_ms": statistics.median(drafts)})
        else:
            rows.append({"schedule": name, "ms_per_unit": statistics.median(values)})
    by_name = {row["schedule"]: row for row in rows}
    unit = "thread" if threads_per_model == 1 else "threads"
    verify_alone = by_name[f"verify alone ({threads_per_model} {unit})"]["ms_per_unit"]
    draft_alone = by_name[f"draft alone ({threads_per_model} {unit})"]["ms_per_unit"]
    rows.append({"schedule": f"ideal overlap ({threads_per_model}+{threads_per_model} threads)",
                 "ms_per_unit": max(verify_alone, draft_alone), "verify_ms": verify_alone, "draft_ms": draft_alone})
    sequential = rows[0]["ms_per_unit"]
    for row in rows:
        if "verify_ms" in row:
            row["vs_sequential"] = sequential / row["ms_per_unit"]
    return rows


def machine(default_threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"processor": platform.processor(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average_1_5_15": load, "torch": torch.__version__, "torch_default_threads": default_threads,
            "python": platform.python_version()}


def format_cell(row: dict, key: str, pattern: str) -> str:
    return format(row[key], pattern) if key in row else "-"


def print_table(rows: list[dict]) -> None:
    print(f"{'schedule':<32} {'ms/unit':>8} {'vs sequential':>14} {'verify ms':>10} {'draft ms':>9}")
    for row in rows:
        print(f"{row['schedule']:<32} {row['ms_per_unit']:>8.1f} {format_cell(row, 'vs_sequential', '.2f'):>14} "
              f"{format_cell(row, 'verify_ms', '.1f'):>10} {format_cell(row, 'draft_ms', '.1f'):>9}")


def markdown(report: dict) -> str:
    info = report["machine"]
    settings = report["settings"]
    lines = [
        f"Pre-draft overlap probe, {report['date']}: {info['cpu_model'] or info['processor']} "
        f"({info['cpu_count']} CPUs), torch {info['torch']} with {info['torch_default_threads']} default threads.",
        f"Prompt {report['prompt']['id']} ({report['prompt']['context_tokens']} tokens of context), "
        f"{settings['verify_tokens']} verified and {settings['draft_tokens']} drafted tokens per unit, "
        f"median of {settings['repeats']} units.",
        "",
        f"`{report['command']}`",
        "",
        "| schedule | ms per unit | vs sequential | verify ms | draft ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['schedule']} | {row['ms_per_unit']:.1f} | {format_cell(row, 'vs_sequential', '.2f')} | "
                     f"{format_cell(row, 'verify_ms', '.1f')} | {format_cell(row, 'draft_ms', '.1f')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="mt-bench",
                        help="prompt suite: mt-bench, humaneval or a JSONL file (default mt-bench)")
    parser.add_argument("--prompt-index", type=int, default=0,
                        help="index of the prompt in the suite whose context every unit follows (default 0)")
    parser.add_argument("--verify-tokens", type=int, default=5,
                        help="tokens in the target's verification forward pass, draft_len + 1 (default 5)")
    parser.add_argument("--draft-tokens", type=int, default=4,
                        help="one-token draft forward passes in the pre-draft (default 4)")
    parser.add_argument("--threads-per-model", type=int, default=1,
                        help="intra-op threads of each model in the threads and processes schedules (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed units per schedule (default 20)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds the units of every schedule are spread over, at most --repeats (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed units per schedule before the rounds (default 2)")
    parser.add_argument("--out-json", type=Path, default=None, help="JSON file for the results (default: none)")
    parser.add_argument("--out-md", type=Path, default=None, help="Markdown file for the results table (default: none)")
    args = parser.parse_args()
    for name in ("verify_tokens", "draft_tokens", "threads_per_model", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("prompt_index", "warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0, got {getattr(args, name)}")
    return args


def main() -> None:
    args = parse_args()
    default_threads = torch.get_num_threads()
    rounds = min(args.rounds, args.repeats)
    transformers_logging.disable_progress_bar()

    prompts = load_suite(args.suite, args.prompt_index + 1).prompts
    if args.prompt_index >= len(prompts):
        raise SystemExit(f"--prompt-index {args.prompt_index} is out of range: suite {args.suite!r} "
                         f"has {len(prompts)} prompts")
    prompt = prompts[args.prompt_index]
    pair = load_pair(device="cpu", dtype="float32")
    ids = encode_prompt(pair.tokenizer, prompt)
    if len(ids) < 2:
        raise SystemExit(f"prompt {prompt.prompt_id} encodes to {len(ids)} token; choose one with at least 2")

    print(f"prompt {prompt.prompt_id}: {len(ids) - 1} tokens of context; starting the draft worker process", flush=True)
    probe = Probe(pair, ids, args, default_threads)
    try:
        samples = run_rounds(probe, args.repeats, rounds, args.warmup)
    finally:
        probe.close()

    rows = summarise(samples, args.threads_per_model)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(default_threads),
        "settings": {**{key: value for key, value in vars(args).items() if not key.startswith("out_")},
                     "rounds": rounds, "default_threads": default_threads},
        "prompt": {"id": prompt.prompt_id, "context_tokens": probe.context},
        "observed_torch_threads": probe.observed_threads,
        "results": rows,
        "unit_ms": samples,
    }
    print_table(rows)
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.out_md:
        args.out_md.write_text(markdown(report))


if __name__ == "__main__":
    main()
