"""``bpsim record``: decode a prompt suite and write one trace row per round."""

from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path

import torch

DEFAULT_MAX_NEW_TOKENS = 256


def add_parser(subparsers) -> None:
    from bpsim.models import BUILTIN_TARGET, SHIPPED_DRAFT

    parser = subparsers.add_parser("record", help="decode a prompt suite and write a trace (one row per round)")
    parser.add_argument("--suite", help="mt-bench, humaneval, or a JSONL file with a 'prompt' field per line")
    parser.add_argument("--limit", type=int, default=None, help="decode only the first N prompts of the suite")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--draft-len", type=int, default=4,
                        help="drafts per round (default 4); 0 decodes with the target alone and loads no draft")
    policy.add_argument("--target-only", action="store_true", help="decode with the target alone (same as --draft-len 0)")
    parser.add_argument("--predraft", action="store_true",
                        help="pre-draft every next round beside verification assuming all drafts are accepted "
                             "(PEARL style), so the trace times the overlap of pre-drafting; give it to "
                             "bpsim fit --latency-traces")
    parser.add_argument("--backend", choices=("auto", "thread", "cuda-stream"), default="auto",
                        help="how --predraft runs beside verification: auto picks cuda-stream on CUDA and thread "
                             "on CPU (default auto)")
    parser.add_argument("--target", default=BUILTIN_TARGET, help=f"target model: built-in name, folder or .gguf (default {BUILTIN_TARGET})")
    parser.add_argument("--draft", default=SHIPPED_DRAFT, help=f"draft model: built-in name, folder or .gguf (default {SHIPPED_DRAFT})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto: CUDA when available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 decodes greedily (default 0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the K most probable tokens (default off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample only from the smallest set of tokens with this probability mass (default 1, off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling; each request derives its own from it (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"new tokens per request at most (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--force", action="store_true", help="overwrite --out, and discard parts an interrupted run left there")
    parser.add_argument("--recover", action="store_true",
                        help="load no model: merge the parts an interrupted run left next to --out into --out")
    parser.add_argument("--out", type=Path, required=True, help="trace file to write, e.g. traces/NAME.parquet")
    parser.set_defaults(run=run)


def run(args) -> int:
    from bpsim.decoding import DecodeConfig
    from bpsim.errors import BpsimError
    from bpsim.prompts import load_suite
    from bpsim.sampling import SamplingConfig
    from bpsim.traces import check_output, recover_trace

    if args.recover:
        path = recover_trace(args.out, overwrite=args.force)
        print(f"recovered the flushed requests of the interrupted run into {path}")
        return 0
    if not args.suite:
        raise BpsimError("--suite is required unless --recover is given; use mt-bench, humaneval or a .jsonl file")
    if args.threads is not None:
        if args.threads < 1:
            raise BpsimError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    # Check every setting and the output path before spending seconds on loading models.
    draft_len = 0 if args.target_only else args.draft_len
    if args.predraft and draft_len < 1:
        raise BpsimError(f"--predraft needs drafts; got draft_len {draft_len}, pass --draft-len 1 or more")
    if args.backend != "auto" and not args.predraft:
        raise BpsimError(f"--backend {args.backend} only applies to --predraft; add --predraft or drop --backend")
    if args.backend == "cuda-stream":
        from bpsim.models import resolve_device

        if resolve_device(args.device).type != "cuda":
            raise BpsimError(f"--backend cuda-stream needs a CUDA device, but --device {args.device} is not one; "
                             "use --backend thread (or auto) on CPU")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    config = DecodeConfig(draft_len=draft_len, max_new_tokens=args.max_new_tokens, sampling=sampling)
    check_output(args.out, overwrite=args.force)
    suite = load_suite(args.suite, args.limit)
    pair = _load_models(args.target, args.draft if draft_len > 0 else None, args.device, args.dtype)
    return record(pair, suite, config, args.out, overwrite=args.force, suite_arg=args.suite,
                  predraft_backend=args.backend if args.predraft else None)


def _load_models(target: str, draft: str | None, device: str, dtype: str):
    """Load the pair, or only the target (with ``draft`` None) when no round drafts."""
    from bpsim.models import ModelPair, load_model, load_pair, resolve_device, resolve_dtype

    if draft is not None:
        return load_pair(target, draft, device, dtype)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    loaded, tokenizer = load_model(target, torch_device, torch_dtype)
    return ModelPair(loaded, None, tokenizer, torch_device, torch_dtype)


def record(pair, suite, config, out: Path, overwrite: bool = False, suite_arg: str | None = None,
           predraft_backend: str | None = None) -> int:
    """Decode every prompt of ``suite``, write the trace to ``out`` and print a summary; return the exit code.

    With ``predraft_backend`` the decoder pre-drafts every next round on that backend, assuming all
    drafts are accepted.
    """
    from tqdm import tqdm

    from bpsim.decoding import SpeculativeDecoder
    from bpsim.prompts import encode_prompt
    from bpsim.sampling import request_generator
    from bpsim.traces import TraceWriter

    prompts = {prompt.prompt_id: encode_prompt(pair.tokenizer, prompt) for prompt in suite.prompts}
    metadata = run_metadata(pair, suite, config, suite_arg or suite.name, prompts)
    if predraft_backend is None:
        decoder = SpeculativeDecoder.from_pair(pair, config)
    else:
        from bpsim.branch import BranchConfig, BranchPredictedDecoder
        from bpsim.predictors.static import StaticPredictor

        predictor = StaticPredictor("all", draft_len=config.draft_len)
        branch = BranchConfig(backend=predraft_backend)
        decoder = BranchPredictedDecoder.from_pair(pair, config, predictor=predictor, branch=branch)
        metadata["policy"] = {"kind": "predraft", "draft_len": config.draft_len, "predictor": predictor.to_config(),
                              "branch": {**branch.to_dict(), "backend": decoder.backend.name}}
    writer = TraceWriter(out, metadata, overwrite=overwrite)
    totals = {"rounds": 0, "accepted": 0, "drafted_rounds": 0, "tokens": 0, "round_ms": 0.0}
    started = time.perf_counter()
    progress = tqdm(suite.prompts, desc="record", unit="request", file=sys.stderr)
    try:
        for request_id, prompt in enumerate(progress):
            generator = request_generator(config.sampling.seed, request_id, pair.device)
            generation = decoder.generate(prompts[prompt.prompt_id], generator)
            writer.add_request(request_id, prompt.prompt_id, list(generation.rounds))
            _add_totals(totals, generation.rounds)
            if totals["drafted_rounds"]:
                progress.set_postfix(accepted=f"{totals['accepted'] / totals['drafted_rounds']:.2f}")
    except KeyboardInterrupt:
        progress.close()
        decoder.close()
        if writer.requests == 0:
            print(f"interrupted before the first request finished; nothing was written to {out}", file=sys.stderr)
            return 130
        path = writer.close(complete=False)
        print(f"interrupted: kept the {writer.requests} finished requests of {len(suite)} in {path}", file=sys.stderr)
        return 130
    progress.close()
    decoder.close()
    path = writer.close()
    _print_summary(path, writer.requests, totals, time.perf_counter() - started)
    return 0


def _add_totals(totals: dict, rounds) -> None:
    for record in rounds:
        totals["rounds"] += 1
        totals["tokens"] += record.emitted
        totals["round_ms"] += record.round_ms
        if record.draft_len > 0:
            totals["drafted_rounds"] += 1
            totals["accepted"] += record.accepted


def _print_summary(path: Path, requests: int, totals: dict, seconds: float) -> None:
    rounds = totals["rounds"]
    accepted = (f"{totals['accepted'] / totals['drafted_rounds']:.2f}" if totals["drafted_rounds"] else "n/a (no drafts)")
    decode_seconds = totals["round_ms"] / 1000
    rate = totals["tokens"] / decode_seconds if decode_seconds > 0 else float("nan")
    print(f"wrote {path}")
    print(f"requests {requests}, rounds {rounds}, tokens {totals['tokens']}, "
          f"mean accepted per drafted round {accepted}, "
          f"tokens/s {rate:.3g} (sum of round times, prompt passes excluded), wall time {seconds:.1f} s")


def run_metadata(pair, suite, config, suite_arg: str, prompts: dict[str, list[int]]) -> dict:
    """Describe a recording run: models, device, sampling, policy, suite and library versions."""
    import numpy
    import pyarrow
    import transformers

    def describe(loaded):
        if loaded is None:
            return None
        return {"name": loaded.name, "sha256": loaded.sha256, "num_layers": loaded.num_layers,
                "vocab_size": loaded.vocab_size}

    sampling = config.sampling
    if config.draft_len > 0:
        policy = {"kind": "speculative", "draft_len": config.draft_len}
    else:
        policy = {"kind": "target-only", "draft_len": 0}
    suite_path = str(Path(suite_arg).resolve()) if Path(suite_arg).is_file() else suite_arg
    return {
        "target": describe(pair.target),
        "draft": describe(pair.draft),
        "device": {"type": pair.device.type, "name": device_name(pair.device), "threads": torch.get_num_threads()},
        "dtype": str(pair.dtype).removeprefix("torch."),
        "sampling": {**sampling.to_dict(), "mode": "greedy" if sampling.greedy else "sample"},
        "seed": sampling.seed,
        "max_new_tokens": config.max_new_tokens,
        "policy": policy,
        "suite": {"name": suite.name, "path": suite_path, "source": suite.source, "prompts": len(suite)},
        "prompt_tokens": prompts,
        "command": "bpsim " + shlex.join(sys.argv[1:]),
        "libraries": {"python": platform.python_version(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "pyarrow": pyarrow.__version__,
                      "numpy": numpy.__version__},
    }


def device_name(device: torch.device) -> str:
    """Return the GPU's name, or the CPU model from /proc/cpuinfo where the platform has one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
