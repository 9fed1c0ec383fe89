"""``bpsim replay TRACES_OR_PROFILES...``: replay policies against recorded acceptances and print their speed."""

from __future__ import annotations

import itertools
import json
import logging
import sys
from pathlib import Path

from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)

DEFAULT_FAMILIES = ("last-value", "exp-average", "saturating-counter", "two-level", "one-bit", "plus2-minus1",
                    "static")
# Families whose constructor takes the latency model; the replay's model is filled in when a spec omits it.
LATENCY_FAMILIES = ("binomial", "capped-geometric", "beta-binomial", "beta-geometric", "empirical", "hazard-glm")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "replay", help="replay target-only, plain speculative, branch-predicted, exhaustive and oracle decoding",
        description="Replay decoding policies on recorded acceptances. Greedy profiles (X.profile.parquet, "
                    "with the trace X.parquet next to them for timings) replay exactly; traces and "
                    "sampling-mode profiles replay approximately, and every output says so.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="TRACES_OR_PROFILES",
                        help="trace files (.parquet) or acceptance profiles (.profile.parquet) of one model pair")
    parser.add_argument("--predictor", action="append", default=[], metavar="NAME[:k=v,...]",
                        help="a predictor family with parameters; 'k=a|b|c' sweeps values and the grid is the "
                             "product (quote it in the shell). Repeat for more. Default: every history "
                             "family and static with default parameters")
    parser.add_argument("--config", action="append", default=[], type=Path, metavar="FILE",
                        help="a predictor config: bpsim export output or a to_config() JSON object or list")
    parser.add_argument("--draft-lens", default="1,2,3,4,5,6,7,8",
                        help="plain speculative draft lengths, comma-separated (default 1..8); "
                             "target-only decoding (0) is always replayed")
    parser.add_argument("--latency-traces", nargs="+", type=Path, default=[], metavar="TRACE",
                        help="traces of the same pair whose timings join the latency fit but whose accepted "
                             "counts are not replayed (e.g. one recorded with bpsim record --predraft)")
    parser.add_argument("--sequential", action="store_true",
                        help="also replay every predictor without pre-drafting: it only sets the next draft_len")
    parser.add_argument("--exhaustive", default="",
                        help="comma-separated branch counts for the exhaustive strategy, applied to every "
                             "predictor ('all' = every branch point); default none")
    parser.add_argument("--first-draft-len", type=int, default=None,
                        help="draft_len of each request's first round for every predictor (default: the predictor's)")
    parser.add_argument("--latency", type=Path, default=None,
                        help="latency model JSON (LatencyModel.to_dict()) instead of fitting the traces' timings")
    parser.add_argument("--assume", action="append", default=[], metavar="FIELD=VALUE",
                        help="set a latency model field and label it assumed, e.g. branch_batch_cost=0.3")
    parser.add_argument("--samples", type=int, default=None,
                        help="draws per request for approximate inputs (default 16; exact profiles use 1)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of requests (default 1000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws and the bootstrap (default 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="torch device of the simulation (default auto: CUDA when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of a CPU replay (default 1; its per-round tensors are small)")
    parser.add_argument("--out", type=Path, default=None, help="folder to write replay.json and replay.md into")
    parser.set_defaults(run=run)


def parse_int_list(text: str, option: str, allow_all: bool = False) -> list[int]:
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if allow_all and item == "all":
            values.append(0)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise BpsimError(f"{option} takes comma-separated integers, got {item!r} in {text!r}") from None
    return values


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_predictor_spec(spec: str) -> list[dict]:
    """Expand ``NAME[:k=v,...]`` (values may list alternatives as ``a|b``) into predictor configs."""
    from bpsim.predictors.base import CONFIG_VERSION

    family, _, rest = spec.partition(":")
    family = family.strip()
    if not family:
        raise BpsimError(f"--predictor {spec!r} has no family name; write NAME[:k=v,...]")
    keys, choices = [], []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise BpsimError(f"--predictor {spec!r}: parameter {item!r} is not k=v")
        keys.append(key.strip())
        choices.append([_value(option.strip()) for option in value.split("|")])
    return [{"version": CONFIG_VERSION, "family": family, "params": dict(zip(keys, combination))}
            for combination in itertools.product(*choices)]


def read_configs(path: Path) -> tuple[list[dict], bool]:
    """Read predictor configs from an exported predictor file or a to_config() object or list.

    Return the configs and whether they are decoded pre-drafting: False only for an exported file
    that says not to pre-draft.
    """
    from bpsim.export import EXPORT_FORMAT, load_exported

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BpsimError(f"--config file {path} not found") from None
    except json.JSONDecodeError as error:
        raise BpsimError(f"--config file {path} is not valid JSON ({error})") from error
    if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT:
        exported = load_exported(path)
        if not exported.predraft:
            logger.info("%s decodes without pre-drafting; its sequential: row is the one that applies", path)
        return [exported.predictor_config], exported.predraft
    configs = data if isinstance(data, list) else [data]
    for index, config in enumerate(configs):
        if not isinstance(config, dict):
            raise BpsimError(f"--config file {path}: entry {index} is not a JSON object; expected "
                             '{"version": ..., "family": ..., "params": {...}}')
    return configs, True


def build_predictors(configs: list[dict], latency) -> list:
    from bpsim.predictors import predictor_from_config

    predictors = []
    for config in configs:
        params = config.get("params")
        if config.get("family") in LATENCY_FAMILIES and isinstance(params, dict) and "latency" not in params:
            config = {**config, "params": {**params, "latency": latency.to_dict()}}
        predictors.append(predictor_from_config(config))
    return predictors


def run(args) -> int:
    from bpsim.atomic import write_text
    from bpsim.latency import LatencyModel
    from bpsim.replay import replay
    from bpsim.replay_data import load_acceptance

    draft_lens = parse_int_list(args.draft_lens, "--draft-lens")
    widths = parse_int_list(args.exhaustive, "--exhaustive", allow_all=True)
    latency = None
    if args.latency:
        try:
            latency = LatencyModel.from_dict(json.loads(args.latency.read_text()))
        except FileNotFoundError:
            raise BpsimError(f"--latency file {args.latency} not found") from None
        except OSError as error:
            raise BpsimError(f"--latency {args.latency} cannot be read ({error}); pass a latency.json file") from error
        except (json.JSONDecodeError, TypeError) as error:
            raise BpsimError(f"--latency file {args.latency} is not a latency model JSON object ({error})") from error
    if latency is not None and args.latency_traces:
        raise BpsimError("--latency replaces the fitted latency model, so --latency-traces would be ignored; "
                         "pass one of them")
    table = load_acceptance(args.inputs, latency=latency, latency_paths=args.latency_traces)
    latency = table.latency
    if args.assume:
        assumptions = {}
        for item in args.assume:
            name, equals, value = item.partition("=")
            try:
                if not equals:
                    raise ValueError(item)
                assumptions[name.strip()] = float(value)
            except ValueError:
                raise BpsimError(f"--assume takes FIELD=NUMBER, got {item!r}") from None
        latency = latency.with_assumptions(**assumptions)

    configs = [config for spec in args.predictor for config in parse_predictor_spec(spec)]
    sequential = args.sequential
    for path in args.config:
        read, predrafts = read_configs(path)
        configs += read
        # A predictor exported for decoding without pre-drafting is replayed in that mode too.
        sequential = sequential or not predrafts
    if not configs:
        configs = [config for family in DEFAULT_FAMILIES for config in parse_predictor_spec(family)]
    predictors = build_predictors(configs, latency)

    result = replay(table, predictors, latency=latency, draft_lens=draft_lens, exhaustive_widths=widths,
                    sequential=sequential,
                    first_draft_len=args.first_draft_len, device=args.device, samples=args.samples,
                    bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed, threads=args.threads,
                    progress=sys.stderr.isatty())
    print(latency.describe())
    print()
    print(result.format_table())
    print(f"({len(result.policies)} policies on {result.device} in {result.seconds:.2f} s)", file=sys.stderr)
    if args.out:
        write_text(args.out / "replay.json", json.dumps(result.to_dict(), indent=1, allow_nan=False))
        write_text(args.out / "replay.md", result.to_markdown())
        print(f"wrote {args.out / 'replay.json'} and {args.out / 'replay.md'}")
    return 0
