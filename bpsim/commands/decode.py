"""``bpsim decode``: branch-predicted decoding with an exported predictor, streaming the text."""

from __future__ import annotations

import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)


def add_model_arguments(parser) -> None:
    """Add the model, device, sampling and pre-draft options that decode and bench share."""
    parser.add_argument("--config", type=Path, required=True, metavar="PREDICTOR.json",
                        help="exported predictor file written by bpsim export")
    parser.add_argument("--target", default=None,
                        help="target model (default: the one the predictor was fitted on, else smollm2-135m)")
    parser.add_argument("--draft", default=None,
                        help="draft model (default: the one the predictor was fitted on, else smollm2-135m-draft4)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--dtype", default="float32", help="float32, float16, bfloat16 or auto (default float32)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per request at most (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default 0)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most probable tokens (default off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1, off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--width", type=int, default=1,
                        help="branch points per pre-draft: 1 the predicted one, W the W nearest it in one batch, "
                             "0 all of them (the exhaustive strategy); default 1")
    parser.add_argument("--backend", default="auto", choices=["auto", "thread", "cuda-stream", "inline"],
                        help="how the pre-draft runs beside verification: auto picks cuda-stream on CUDA and "
                             "thread on CPU; inline runs it afterwards, without overlap (default auto)")
    parser.add_argument("--predraft", choices=("auto", "on", "off"), default="auto",
                        help="pre-draft the next round beside verification (on), or only let the predictor set "
                             "draft lengths (off); auto follows the exported config, which chose the faster mode "
                             "in its held-out replay (default auto)")
    parser.add_argument("--threads-per-model", type=int, default=1,
                        help="torch intra-op threads per model while pre-drafting on the thread backend (default 1)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "decode", help="decode prompts with branch prediction and an exported predictor, streaming the text",
        description="Decode with branch-predicted speculative decoding: the exported predictor guesses each "
                    "round's accepted count and the draft pre-drafts the next round from that branch point while "
                    "the target verifies. The text streams to stdout as rounds complete; a summary per request "
                    "(tokens, rounds, mean accepted drafts, pre-draft hit rate, tokens/s) goes to stderr.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", default=None, help="one prompt text, sent as a chat message")
    source.add_argument("--suite", default=None, help="prompt suite: mt-bench, humaneval or a .jsonl file")
    parser.add_argument("--limit", type=int, default=None, help="decode only the first N prompts of the suite")
    parser.add_argument("--skip", type=int, default=0, help="skip the first N prompts of the suite (default 0)")
    parser.add_argument("--no-chat", action="store_true", help="send --prompt as plain text, without the chat template")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=None, help="trace file (.parquet) to write every round to")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out trace")
    parser.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------
# Shared with bpsim bench


def _model_name(entry) -> str | None:
    if isinstance(entry, dict):
        return entry.get("name")
    return entry if isinstance(entry, str) else None


def model_names(exported, target: str | None, draft: str | None) -> tuple[str, str]:
    """Return the target and draft to load: the options, else the pair the predictor was fitted on."""
    from bpsim.models import BUILTIN_TARGET, SHIPPED_DRAFT

    # The first speculative pair: a target-only trace in the fit lists an entry without a draft.
    entries = [entry for entry in exported.fitted_on.get("models") or [] if isinstance(entry, dict)]
    fitted = next((entry for entry in entries if entry.get("draft") is not None), entries[0] if entries else {})
    return (target or _model_name(fitted.get("target")) or BUILTIN_TARGET,
            draft or _model_name(fitted.get("draft")) or SHIPPED_DRAFT)


def load_models(args, exported):
    """Load the model pair named by the options or the exported predictor."""
    from bpsim import models

    target, draft = model_names(exported, args.target, args.draft)
    logger.info("loading target %s and draft %s on %s", target, draft, args.device)
    pair = models.load_pair(target, draft, args.device, args.dtype)
    mismatch = fitted_pair_mismatch(exported, pair)
    if mismatch:
        logger.warning("%s", mismatch)
    return pair


def fitted_pair_mismatch(exported, pair) -> str | None:
    """Say how the loaded pair differs from the pairs the predictor was fitted on; None when it is one of them.

    Models are compared by the sha256 of their weights, so a renamed copy still matches. A predictor
    fitted on other models still decodes losslessly, but its predictions and draft lengths were
    chosen for the acceptance and latency of those models.
    """
    loaded = {"target": pair.target, "draft": pair.draft}
    fitted = [entry for entry in exported.fitted_on.get("models") or [] if isinstance(entry, dict)
              and isinstance(entry.get("draft"), dict)]
    if not fitted:
        return None
    def same(entry: dict, loaded_model) -> bool:
        # Hub models without a local file have no digest; compare those by name.
        if loaded_model is None or not isinstance(entry, dict):
            return False
        digest = loaded_model.sha256
        if digest and digest != "unknown":
            return entry.get("sha256") == digest
        return entry.get("name") == loaded_model.name

    for entry in fitted:
        if all(same(entry.get(role), loaded[role]) for role in loaded):
            return None
    names = "; ".join(f"target {_model_name(entry.get('target'))}, draft {_model_name(entry.get('draft'))}"
                      for entry in fitted)
    return (f"the predictor was fitted on {names}, but the loaded target {pair.target.name} and draft "
            f"{pair.draft.name if pair.draft is not None else None} have other weights; decoding stays lossless, "
            "but record, fit and export again on this pair for predictions that fit it")


def sampling_config(args):
    from bpsim.sampling import SamplingConfig, SamplingConfigError

    try:
        return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except SamplingConfigError as error:
        raise BpsimError(f"invalid sampling option: {error}") from error


def sampling_metadata(sampling) -> dict:
    return {"mode": "greedy" if sampling.greedy else "sample", **sampling.to_dict()}


def model_metadata(loaded) -> dict:
    return {"name": loaded.name, "sha256": loaded.sha256, "num_layers": loaded.num_layers,
            "vocab_size": loaded.vocab_size}


def run_metadata(pair, sampling, command: str) -> dict:
    """Return the trace metadata every decode and bench trace shares."""
    import torch

    from bpsim import __version__

    return {"command": command, "target": model_metadata(pair.target), "draft": model_metadata(pair.draft),
            "sampling": sampling_metadata(sampling), "device": str(pair.device),
            "dtype": str(pair.dtype).removeprefix("torch."), "torch_version": torch.__version__,
            "bpsim_version": __version__, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                                                    f"{torch.get_num_threads()} torch threads"}


def load_prompts(args, tokenizer, suite=None) -> tuple[list, dict | None]:
    """Return ``(prompts, suite metadata)``; each prompt is ``(prompt_id, token ids)``.

    ``suite`` is the suite ``select_suite`` already loaded, if any.
    """
    from bpsim.prompts import Prompt, encode_prompt

    if getattr(args, "prompt", None) is not None:
        if not args.prompt.strip():
            raise BpsimError("--prompt is empty; pass some text to decode")
        prompt = Prompt("prompt/0", args.prompt, chat=not getattr(args, "no_chat", False))
        return [(prompt.prompt_id, encode_prompt(tokenizer, prompt))], None
    skip = getattr(args, "skip", 0)
    if suite is None:
        suite = select_suite(args)
    return ([(prompt.prompt_id, encode_prompt(tokenizer, prompt)) for prompt in suite.prompts],
            {"name": suite.name, "path": args.suite, "source": suite.source, "prompts": len(suite), "skipped": skip})


def select_suite(args):
    """Load the prompts that --suite, --skip and --limit select, or return None for --prompt.

    Called before the models load, so a bad suite or count fails in a moment.
    """
    from bpsim.prompts import load_suite

    if getattr(args, "suite", None) is None:
        return None
    return load_suite(args.suite, args.limit, getattr(args, "skip", 0))


def load_predictor(exported, predraft: bool | None = None):
    """Build the exported predictor, giving the distribution families the exported latency model.

    With ``predraft`` given, the predictor chooses draft lengths for a decoder in that mode, which
    may differ from the exported one when ``--predraft`` overrides it.
    """
    from bpsim.commands.replay import build_predictors
    from bpsim.replay import for_mode

    predictor = build_predictors([exported.predictor_config], exported.latency)[0]
    return predictor if predraft is None else for_mode(predictor, predraft)


def branch_config(args, exported):
    """Build the pre-draft settings from the options; ``--predraft auto`` takes the exported config's mode."""
    from bpsim.branch import BranchConfig
    from bpsim.decoding import DecodingError

    predraft = exported.predraft if args.predraft == "auto" else args.predraft == "on"
    try:
        return BranchConfig(predraft=predraft, width=args.width, backend=args.backend,
                            threads_per_model=args.threads_per_model)
    except DecodingError as error:
        raise BpsimError(f"invalid pre-draft option: {error}") from error


def check_max_new_tokens(value: int) -> None:
    if value < 1:
        raise BpsimError(f"--max-new-tokens must be at least 1, got {value}")


@dataclass(frozen=True)
class RequestSummary:
    """Per-request figures printed after each request and stored by the bench."""

    tokens: int
    rounds: int
    mean_accepted: float  # accepted drafts per round that drafted any
    hits: int
    predrafts: int  # pre-drafts checked
    decode_ms: float  # sum of round_ms, prefill excluded
    prefill_ms: float

    @classmethod
    def of(cls, generation) -> "RequestSummary":
        drafted = [record for record in generation.rounds if record.draft_len > 0]
        checked = [record for record in generation.rounds if record.predraft_hit is not None]
        return cls(tokens=len(generation.tokens), rounds=len(generation.rounds),
                   mean_accepted=(sum(record.accepted for record in drafted) / len(drafted)) if drafted else 0.0,
                   hits=sum(bool(record.predraft_hit) for record in checked), predrafts=len(checked),
                   decode_ms=sum(record.round_ms for record in generation.rounds), prefill_ms=generation.prefill_ms)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.tokens / self.decode_ms if self.decode_ms > 0 else float("nan")

    def describe(self) -> str:
        hit_rate = f"{self.hits / self.predrafts:.0%} ({self.hits}/{self.predrafts})" if self.predrafts else "-"
        return (f"{self.tokens} tokens in {self.rounds} rounds, {self.mean_accepted:.2f} accepted drafts per round, "
                f"pre-draft hit rate {hit_rate}, {self.tokens_per_s:.1f} tokens/s "
                f"(prefill {self.prefill_ms:.0f} ms excluded)")


class TextStream:
    """Print the decoded text of a growing token list, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, tokens) -> None:
        self.tokens.extend(tokens)
        # A character whose bytes are split over tokens decodes as U+FFFD until its last token arrives.
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).rstrip("\ufffd")
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


# ---------------------------------------------------------------------------------------------
# The command


def run(args) -> int:
    from bpsim.branch import BranchPredictedDecoder
    from bpsim.decoding import DecodeConfig
    from bpsim.export import load_exported
    from bpsim.replay import predictor_label
    from bpsim.sampling import request_generator
    from bpsim.traces import TraceError, TraceWriter

    check_max_new_tokens(args.max_new_tokens)
    if args.limit is not None and args.prompt is not None:
        raise BpsimError("--limit applies to --suite only; drop it or decode a suite")
    if args.skip and args.prompt is not None:
        raise BpsimError("--skip applies to --suite only; drop it or decode a suite")
    exported = load_exported(args.config)
    sampling = sampling_config(args)
    branch = branch_config(args, exported)
    if not branch.predraft and (args.backend != "auto" or args.width != 1):
        raise BpsimError("--backend and --width set how the decoder pre-drafts, but it does not pre-draft "
                         "(--predraft off, or the exported config chose not to); drop them or pass --predraft on")
    selected = select_suite(args)
    if args.out is not None and args.out.exists() and not args.force:
        raise BpsimError(f"{args.out} already exists; pass --force to overwrite it or choose another --out")
    pair = load_models(args, exported)
    prompts, suite = load_prompts(args, pair.tokenizer, selected)
    predictor = load_predictor(exported, branch.predraft)
    config = DecodeConfig(draft_len=exported.first_draft_len, max_new_tokens=args.max_new_tokens, sampling=sampling)

    writer = None
    if args.out is not None:
        metadata = {**run_metadata(pair, sampling, "decode"), "suite": suite,
                    "policy": {"name": f"branch:{predictor_label(predictor)}", "predictor": exported.predictor_config,
                               "first_draft_len": exported.first_draft_len, "branch": branch.to_dict(),
                               "config_file": str(args.config)},
                    "max_new_tokens": args.max_new_tokens, "prompt_tokens": dict(prompts)}
        try:
            writer = TraceWriter(args.out, metadata, overwrite=args.force)
        except TraceError as error:
            raise BpsimError(str(error)) from error

    complete = False
    decoder = BranchPredictedDecoder.from_pair(pair, config, predictor=predictor, branch=branch)
    try:
        for index, (prompt_id, ids) in enumerate(prompts):
            if len(prompts) > 1:
                print(f"=== {prompt_id}", flush=True)
            stream = TextStream(pair.tokenizer)
            generator = None if sampling.greedy else request_generator(sampling.seed, index, pair.device)
            generation = decoder.generate(ids, generator, on_round=lambda record: stream.add(record.tokens))
            stream.end()
            print(f"[{prompt_id}] {RequestSummary.of(generation).describe()}", file=sys.stderr, flush=True)
            if writer is not None:
                writer.add_request(index, prompt_id, list(generation.rounds))
        complete = True
    except KeyboardInterrupt:
        if writer is not None:
            path = writer.close(complete=False)
            print(f"\ninterrupted; the rounds of {writer.requests} finished request(s) are in {path}", file=sys.stderr)
            writer = None
        raise
    finally:
        decoder.close()
        if writer is not None:
            writer.close(complete=complete)
    if args.out is not None:
        print(f"wrote the trace to {args.out}", file=sys.stderr)
    return 0

