"""``bpsim pipeline``: record -> profile -> fit -> replay -> export -> bench in one run folder.

Each stage is the stage's own command, run with the folder's paths, so the pipeline adds no
second implementation of any stage. A stage whose output already exists is skipped, so an
interrupted pipeline resumes where it stopped when run again with the same ``--out``.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
from pathlib import Path

from bpsim.atomic import write_text
from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)


class PipelineError(BpsimError, RuntimeError):
    """A stage of the pipeline failed; the message names the stage and its output folder."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="run every stage on one suite into one run folder")
    parser.add_argument("--suite", default="mt-bench", help="prompt suite: mt-bench, humaneval or a JSONL file (default mt-bench)")
    parser.add_argument("--limit", type=int, default=24, help="prompts recorded for fitting (default 24)")
    parser.add_argument("--bench-limit", type=int, default=8,
                        help="prompts decoded live by every policy of the bench, taken after the recorded ones "
                             "(default 8)")
    parser.add_argument("--draft-len", type=int, default=4, help="draft_len of the recorded speculative trace (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument("--target", default=None, help="target model (default: the built-in smollm2-135m)")
    parser.add_argument("--draft", default=None, help="draft model (default: the shipped smollm2-135m-draft4)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for recording (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="run folder (default runs/pipeline)")
    parser.add_argument("--skip-bench", action="store_true", help="stop after export (the bench is the slowest stage)")
    parser.set_defaults(run=run)


def _stage(name: str, output: Path, argv: list[str], timings: dict, partial: Path | None = None) -> None:
    """Run one stage command unless ``output`` exists; raise if it fails.

    ``partial`` is the folder a stage fills before it writes ``output``. What an interrupted run
    left, a trace marked incomplete or a ``partial`` folder without ``output``, is moved aside
    (never deleted) and the stage runs again.
    """
    from bpsim.cli import main

    if output.exists() and _incomplete_trace(output):
        _move_aside(name, output, output.with_name(output.name.removesuffix(".parquet") + ".interrupted.parquet"))
    elif not output.exists() and partial is not None and partial.exists():
        _move_aside(name, partial, partial.with_name(partial.name + ".interrupted"))
    if output.exists():
        logger.info("stage %s: %s exists, skipped", name, output)
        timings[name] = "skipped (output existed)"
        return
    logger.info("stage %s: bpsim %s", name, " ".join(argv))
    started = time.perf_counter()
    code = main(argv)
    if code == 130:
        if output.exists():
            remains = f"what it finished is kept in {output}, marked incomplete"
        elif partial is not None and partial.exists() and any(partial.iterdir()):
            remains = f"what it finished is kept in {partial}"
        else:
            remains = "it finished nothing that could be kept"
        raise PipelineError(f"interrupted in stage {name}; {remains}. Rerun the pipeline with the same --out to "
                            "resume: finished stages are skipped, and what an interrupted stage left is kept "
                            "aside while the stage runs again")
    if code != 0:
        raise PipelineError(f"stage {name} failed with exit code {code} (command: bpsim {' '.join(argv)}); "
                            f"fix the error above and rerun the pipeline with the same --out to resume")
    timings[name] = f"{time.perf_counter() - started:.1f} s"


def _move_aside(stage: str, path: Path, aside: Path) -> None:
    """Rename what an interrupted run of ``stage`` left at ``path`` to a free name based on ``aside``."""
    aside = _free_path(aside)
    path.rename(aside)
    logger.warning("stage %s: %s was left by an interrupted run; kept it as %s and running the stage again",
                   stage, path, aside)


def _incomplete_trace(path: Path) -> bool:
    """Whether ``path`` is a trace whose metadata marks its run as interrupted."""
    if path.suffix != ".parquet" or path.name.endswith(".profile.parquet"):
        return False
    import pyarrow.parquet as pq

    from bpsim.traces import METADATA_KEY

    try:
        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        return bool(raw) and json.loads(raw).get("complete") is False
    except (OSError, ValueError):
        return False


def _free_path(path: Path) -> Path:
    """Return ``path``, or ``path`` with a number before its ``.parquet`` suffix (if any) when it exists."""
    stem, suffix = (path.name.removesuffix(".parquet"), ".parquet") if path.name.endswith(".parquet") else (path.name, "")
    candidate, number = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{stem}-{number}{suffix}")
        number += 1
    return candidate


def check_prompt_counts(args) -> None:
    """Check before any stage runs that the suite has prompts left for the bench after the recorded ones."""
    from bpsim.prompts import load_suite

    available = len(load_suite(args.suite).prompts)
    if args.limit < 1:
        raise PipelineError(f"--limit must be at least 1, got {args.limit}")
    if args.skip_bench:
        return
    if args.bench_limit < 1:
        raise PipelineError(f"--bench-limit must be at least 1, got {args.bench_limit}")
    if args.limit >= available:
        raise PipelineError(f"--limit {args.limit} records every prompt of {args.suite} ({available}), leaving none "
                            "for the bench, which runs on the prompts after the recorded ones; lower --limit or "
                            "pass --skip-bench")
    if args.limit + args.bench_limit > available:
        logger.warning("%s has %d prompts: the bench gets %d after the %d recorded, not --bench-limit %d",
                       args.suite, available, available - args.limit, args.limit, args.bench_limit)


def run(args) -> int:
    out: Path = args.out
    check_prompt_counts(args)
    traces = out / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    models = []
    if args.target:
        models += ["--target", args.target]
    if args.draft:
        models += ["--draft", args.draft]
    common = ["--device", args.device, "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed)]
    record_options = common + (["--threads", str(args.threads)] if args.threads else [])
    spec = traces / f"greedy-k{args.draft_len}.parquet"
    target_only = traces / "greedy-target.parquet"
    predraft = traces / f"greedy-k{args.draft_len}-predraft.parquet"
    profile = traces / f"greedy-k{args.draft_len}.profile.parquet"
    timings: dict[str, str] = {}

    # 1. Record a speculative trace, a shorter target-only one so the latency model gets verify
    #    passes of two lengths, and a shorter pre-drafting one that times the overlap.
    _stage("record", spec, ["record", "--suite", args.suite, "--limit", str(args.limit), "--draft-len",
                            str(args.draft_len), *models, *record_options, "--out", str(spec)], timings)
    _stage("record target-only", target_only,
           ["record", "--suite", args.suite, "--limit", str(max(1, args.limit // 4)), "--target-only", *models,
            *record_options, "--out", str(target_only)], timings)
    _stage("record pre-draft", predraft,
           ["record", "--suite", args.suite, "--limit", str(max(1, args.limit // 4)), "--draft-len",
            str(args.draft_len), "--predraft", *models, *record_options, "--out", str(predraft)], timings)
    # 2. Profile: teacher-forced acceptance per position, for exact greedy replay at any draft_len.
    _stage("profile", profile, ["profile", str(spec), "--device", args.device, "--out", str(profile)], timings)
    # 3. Fit every predictor family on a split by request, and the latency model on every trace.
    _stage("fit", out / "fit" / "summary.json",
           ["fit", str(spec), str(target_only), "--latency-traces", str(predraft), "--out", str(out / "fit"),
            "--seed", str(args.seed)], timings)
    # 4. Replay every policy on the profile with the fit's latency model, with and without pre-drafting.
    _stage("replay", out / "replay" / "replay.json",
           ["replay", str(profile), "--latency", str(out / "fit" / "latency.json"), "--sequential", "--device",
            args.device, "--seed", str(args.seed), "--out", str(out / "replay")], timings)
    # 5. Export the predictor with the best replayed speed on held-out requests.
    predictor = out / "predictor.json"
    _stage("export", predictor, ["export", str(out / "fit"), "--out", str(predictor), "--seed", str(args.seed)], timings)
    # 6. Bench: every policy live on the same prompts, interleaved, on prompts the fit did not see.
    if not args.skip_bench:
        _stage("bench", out / "bench" / "bench.json",
               ["bench", "--config", str(predictor), "--suite", args.suite, "--skip", str(args.limit), "--limit",
                str(args.bench_limit), *models, *common, "--out", str(out / "bench")], timings,
               partial=out / "bench")
    write_text(out / "report.md", _report(out, args, timings))
    print(f"pipeline finished: {out / 'report.md'}")
    return 0


def _section(title: str, path: Path) -> str:
    if not path.is_file():
        return f"## {title}\n\n(not produced: {path.name} is missing)\n"
    text = path.read_text().strip()
    # Demote the stage report's own headings under this section.
    text = "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())
    # Image links in the stage report are relative to its own folder.
    text = re.sub(r"!\[([^\]]*)\]\((?!/|https?:)", rf"![\1]({path.parent.name}/", text)
    return f"## {title}\n\n{text}\n"


def _report(out: Path, args, timings: dict) -> str:
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("run",)}
    lines = [
        "# bpsim pipeline report", "",
        f"Created {created}. Settings: `{json.dumps(settings)}`.", "",
        "| stage | time |", "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in timings.items()], "",
        _section("Fit", out / "fit" / "report.md"),
        _section("Replay", out / "replay" / "replay.md"),
        _section("Bench", out / "bench" / "bench.md"),
    ]
    predictor = out / "predictor.json"
    if predictor.is_file():
        lines += ["## Exported predictor", "", "```json", predictor.read_text().strip()[:4000], "```", ""]
    return "\n".join(lines)
