"""Export the fitted predictor with the best replayed speed on held-out requests as a versioned JSON config.

``bpsim fit`` leaves ``summary.json`` in its folder: every candidate predictor's config, the
traces, and the seed and test fraction of its train/test split by request. The exporter
rebuilds that split and replays every candidate on the held-out requests. The replay is exact
from greedy profiles ``X.profile.parquet`` next to the traces, and approximate from the traces
alone. Every candidate is replayed twice: pre-drafting beside verification, and without
pre-drafting (it then only sets draft lengths), because a pre-draft pays only where the two models
overlap. The replay is kept in the fit folder as ``replay-heldout.json`` and ``replay-heldout.md``,
and the fastest candidate and mode are written as:

    {
      "format": "bpsim-predictor", "version": 1,
      "predictor": {"version": 1, "family": ..., "params": {...}},   # Predictor.to_config()
      "draft_len_policy": {"first_draft_len": int, "max_draft_len": int},
      "predraft": bool,                                              # pre-draft beside verification or not
      "latency": {...},                                              # LatencyModel.to_dict()
      "fitted_on": {"traces": [{"path", "sha256", "requests"}], "latency_traces": [...same...],
                    "models": [{"target", "draft"}],
                    "sampling": [...], "fit_dir": str, "summary_created_at": str},
      "expected": {"mode", "held_out", "held_out_requests", "confidence", "best_plain_draft_len",
                   "tokens_per_s", "speedup_vs_target", "speedup_vs_best_plain", "hit_rate"},
      "created_at": str, "bpsim_version": str
    }

Each interval is ``[value, low, high]``. ``load_exported`` checks every field and names the
field and the fix when one is missing, of the wrong type, or of an unknown version or family.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bpsim import __version__
from bpsim.atomic import write_text
from bpsim.errors import BpsimError
from bpsim.latency import LatencyModel, LatencyModelError
from bpsim.predictors.base import Predictor, PredictorConfigError, predictor_from_config

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "bpsim-predictor"
EXPORT_VERSION = 1
SUMMARY_VERSION = 1  # the summary.json version of bpsim fit that this exporter reads
HELDOUT_REPLAY = "replay-heldout.json"
INTERVAL_KEYS = ("tokens_per_s", "speedup_vs_target", "speedup_vs_best_plain", "hit_rate")


class ExportError(BpsimError, ValueError):
    """A fit folder that cannot be exported, or an exported config that is invalid."""


@dataclass(frozen=True)
class ExportedPredictor:
    """A validated exported predictor config; ``predictor()`` builds the predictor it describes."""

    predictor_config: dict
    first_draft_len: int
    max_draft_len: int
    latency: LatencyModel
    fitted_on: dict
    expected: dict
    created_at: str
    bpsim_version: str
    predraft: bool = True  # whether the decoder pre-drafts beside verification; absent in older files means True

    def predictor(self) -> Predictor:
        return predictor_from_config(self.predictor_config)

    def to_dict(self) -> dict:
        return {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "predictor": self.predictor_config,
            "draft_len_policy": {"first_draft_len": self.first_draft_len, "max_draft_len": self.max_draft_len},
            "predraft": self.predraft,
            "latency": self.latency.to_dict(), "fitted_on": self.fitted_on, "expected": self.expected,
            "created_at": self.created_at, "bpsim_version": self.bpsim_version,
        }


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _require(data: dict, key: str, kind, where: str, fix: str):
    if key not in data:
        raise ExportError(f"{where}: field {key!r} is missing; {fix}")
    value = data[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ExportError(f"{where}: field {key!r} must be an integer, got {value!r}; {fix}")
    if kind is not int and not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ExportError(f"{where}: field {key!r} must be {expected}, got {type(value).__name__}; {fix}")
    return value


def _check_keys(data: dict, allowed, where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ExportError(f"{where}: unknown field {unknown[0]!r}; expected only {', '.join(sorted(allowed))}. "
                          "Remove it, or export the config again with this bpsim version")


def _check_interval(value, name: str, where: str) -> None:
    if value is None and name == "hit_rate":
        return
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ExportError(f"{where}: field {name!r} must be [value, low, high], got {value!r}; export it again")
    low_ok, high_ok = value[1] <= value[0] + 1e-9, value[0] <= value[2] + 1e-9
    if not (low_ok and high_ok):
        raise ExportError(f"{where}: field {name!r} = {value} does not satisfy low <= value <= high; export it again")


def validate_exported(data, source: str = "the exported config") -> ExportedPredictor:
    """Check every field of an exported config dict and return it as an ``ExportedPredictor``."""
    fix = "export it again with bpsim export"
    if not isinstance(data, dict):
        raise ExportError(f"{source} must be a JSON object, got {type(data).__name__}; {fix}")
    fmt = _require(data, "format", str, source, fix)
    if fmt != EXPORT_FORMAT:
        raise ExportError(f"{source}: field 'format' is {fmt!r}, expected {EXPORT_FORMAT!r}; "
                          "pass a file written by bpsim export")
    version = _require(data, "version", int, source, fix)
    if version > EXPORT_VERSION:
        raise ExportError(f"{source}: field 'version' is {version}, newer than version {EXPORT_VERSION} that this "
                          "bpsim reads; upgrade bpsim to load it")
    if version < 1:
        raise ExportError(f"{source}: field 'version' is {version}, but versions start at 1; {fix}")
    _check_keys(data, ("format", "version", "predictor", "draft_len_policy", "predraft", "latency", "fitted_on",
                       "expected", "created_at", "bpsim_version"), source)

    config = _require(data, "predictor", dict, source, fix)
    config_where = f"{source}: field 'predictor'"
    _check_keys(config, ("version", "family", "params"), config_where)
    for key, kind in (("version", int), ("family", str), ("params", dict)):
        _require(config, key, kind, config_where, fix)
    try:
        predictor = predictor_from_config(config)
    except PredictorConfigError as error:
        raise ExportError(f"{config_where}: {error}") from error

    policy = _require(data, "draft_len_policy", dict, source, fix)
    policy_where = f"{source}: field 'draft_len_policy'"
    _check_keys(policy, ("first_draft_len", "max_draft_len"), policy_where)
    first = _require(policy, "first_draft_len", int, policy_where, fix)
    maximum = _require(policy, "max_draft_len", int, policy_where, fix)
    if not 0 <= first <= maximum:
        raise ExportError(f"{policy_where}: need 0 <= first_draft_len <= max_draft_len, got {first} and {maximum}; "
                          f"{fix}")

    latency_data = _require(data, "latency", dict, source, fix)
    try:
        latency = LatencyModel.from_dict(latency_data)
    except (LatencyModelError, TypeError) as error:
        raise ExportError(f"{source}: field 'latency' is not a valid latency model ({error}); {fix}") from error

    fitted_on = _require(data, "fitted_on", dict, source, fix)
    fitted_where = f"{source}: field 'fitted_on'"
    _check_keys(fitted_on, ("traces", "latency_traces", "models", "sampling", "fit_dir", "summary_created_at"),
                fitted_where)
    traces = _require(fitted_on, "traces", list, fitted_where, fix)
    if not traces:
        raise ExportError(f"{fitted_where}: field 'traces' is empty; {fix}")
    timing = _require(fitted_on, "latency_traces", list, fitted_where, fix) if "latency_traces" in fitted_on else []
    for index, trace in [(f"traces[{i}]", t) for i, t in enumerate(traces)] + [
            (f"latency_traces[{i}]", t) for i, t in enumerate(timing)]:
        where = f"{fitted_where}: {index}"
        if not isinstance(trace, dict):
            raise ExportError(f"{where} must be an object with path, sha256 and requests; {fix}")
        _check_keys(trace, ("path", "sha256", "requests"), where)
        _require(trace, "path", str, where, fix)
        _require(trace, "sha256", (str, type(None)), where, fix)
        _require(trace, "requests", (int, type(None)), where, fix)
    _require(fitted_on, "models", list, fitted_where, fix)
    _require(fitted_on, "sampling", list, fitted_where, fix)
    _require(fitted_on, "fit_dir", str, fitted_where, fix)
    _require(fitted_on, "summary_created_at", (str, type(None)), fitted_where, fix)

    expected = _require(data, "expected", dict, source, fix)
    expected_where = f"{source}: field 'expected'"
    _check_keys(expected, ("mode", "approximation", "held_out", "held_out_requests", "confidence",
                           "best_plain_draft_len", *INTERVAL_KEYS), expected_where)
    mode = _require(expected, "mode", str, expected_where, fix)
    if mode not in ("exact", "approximate"):
        raise ExportError(f"{expected_where}: field 'mode' must be 'exact' or 'approximate', got {mode!r}; {fix}")
    _require(expected, "approximation", str, expected_where, fix)
    _require(expected, "held_out", bool, expected_where, fix)
    _require(expected, "held_out_requests", int, expected_where, fix)
    _require(expected, "best_plain_draft_len", int, expected_where, fix)
    confidence = _require(expected, "confidence", float, expected_where, fix)
    if not 0 < confidence < 1:
        raise ExportError(f"{expected_where}: field 'confidence' must lie in (0, 1), got {confidence}; {fix}")
    for name in INTERVAL_KEYS:
        if name not in expected:
            raise ExportError(f"{expected_where}: field {name!r} is missing; {fix}")
        _check_interval(expected[name], name, expected_where)

    created_at = _require(data, "created_at", str, source, fix)
    bpsim_version = _require(data, "bpsim_version", str, source, fix)
    predraft = _require(data, "predraft", bool, source, fix) if "predraft" in data else True
    chosen_for = getattr(predictor, "predraft", predraft)
    if chosen_for != predraft:
        raise ExportError(f"{source}: field 'predraft' is {str(predraft).lower()}"
                          f"{'' if 'predraft' in data else ' (absent, so true)'}, but the predictor's params were "
                          f"chosen for predraft {str(chosen_for).lower()}; {fix}")
    del predictor  # built only to validate the config
    return ExportedPredictor(predictor_config=config, first_draft_len=first, max_draft_len=maximum, latency=latency,
                             fitted_on=fitted_on, expected=expected, created_at=created_at,
                             bpsim_version=bpsim_version, predraft=predraft)


def load_exported(path: Path | str) -> ExportedPredictor:
    """Read and validate an exported predictor file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"exported predictor {path} not found; write one with bpsim export FIT_DIR --out {path}") from None
    except json.JSONDecodeError as error:
        raise ExportError(f"{path} is not valid JSON ({error}); export it again with bpsim export") from error
    return validate_exported(data, str(path))


# ---------------------------------------------------------------------------------------------
# Choosing the winner


def read_summary(fit_dir: Path) -> dict:
    path = fit_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} not found; run bpsim fit TRACES --out {fit_dir} first") from None
    except json.JSONDecodeError as error:
        raise ExportError(f"{path} is not valid JSON ({error}); run bpsim fit again") from error
    version = summary.get("version") if isinstance(summary, dict) else None
    if version != SUMMARY_VERSION:
        raise ExportError(f"{path}: summary version {version!r} is not supported (this bpsim reads version "
                          f"{SUMMARY_VERSION}); run bpsim fit again with this bpsim version")
    for key in ("traces", "overall", "seed", "test_fraction"):
        if key not in summary:
            raise ExportError(f"{path}: field {key!r} is missing; run bpsim fit again")
    return summary


def candidate_configs(summary: dict) -> list[dict]:
    """Return the distinct predictor configs that ``bpsim fit`` scored, the winner first."""
    configs = [summary.get("winner", {}).get("config")]
    configs += [entry.get("config") for entry in summary["overall"].get("predictors", [])]
    distinct = []
    for config in configs:
        if isinstance(config, dict) and config not in distinct:
            distinct.append(config)
    if not distinct:
        raise ExportError("summary.json names no predictor config; run bpsim fit again")
    return distinct


def held_out_table(summary: dict):
    """Rebuild the fit's train/test split and return ``(table of the test requests, held_out)``.

    The acceptances come from ``X.profile.parquet`` next to each trace when it exists.
    """
    from bpsim.commands.fit import drop_target_only, load_traces
    from bpsim.fitting import split_by_request
    from bpsim.replay_data import load_acceptance, trace_path_of_profile

    paths = [Path(p) for p in summary["traces"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ExportError(f"trace {missing[0]} named in summary.json not found; run bpsim export from the folder "
                          "bpsim fit ran in, or fit again")
    # The fit kept its latency model, so its latency traces are only read for a summary without it.
    has_latency = "latency" in summary
    latency_paths = [] if has_latency else [Path(p) for p in summary.get("latency_traces", [])]
    rounds, _, latency = load_traces(paths, pool=bool(summary.get("pooled")), latency_paths=latency_paths)
    if has_latency:
        latency = LatencyModel.from_dict(summary["latency"])
    rounds = drop_target_only(rounds)
    _, test, held_out = split_by_request(rounds, float(summary["test_fraction"]), int(summary["seed"]))
    test_names = {str(rounds.request_names[r]) for r in np.unique(test.request)}
    inputs = []
    for path in paths:
        profile = path.with_name(path.name[: -len(".parquet")] + ".profile.parquet")
        inputs.append(profile if profile.is_file() and trace_path_of_profile(profile) == path else path)
    table = load_acceptance(inputs, latency=latency)
    keys = [label.rsplit(":", 1) for label in table.request_labels]
    chosen = [i for i, (source, request) in enumerate(keys) if f"{source}#{request}" in test_names]
    if len(chosen) != len(test_names):
        raise ExportError(f"found {len(chosen)} of the {len(test_names)} held-out requests in the traces; the "
                          "traces changed since bpsim fit ran, so fit them again")
    return table.subset(chosen), held_out


def heldout_replay(fit_dir: Path, summary: dict, device: str = "auto", bootstrap: int = 1000, seed: int = 0,
                   recompute: bool = False, threads: int | None = None) -> dict:
    """Return the replay of every candidate on the held-out requests, computing and keeping it when needed."""
    from bpsim.replay import replay

    path = fit_dir / HELDOUT_REPLAY
    configs = candidate_configs(summary)
    if path.is_file() and not recompute:
        kept = json.loads(path.read_text())
        if (kept.get("summary_created_at") == summary.get("created_at")
                and kept.get("candidate_configs") == configs and kept.get("sequential")):
            logger.info("using the held-out replay kept in %s", path)
            return kept
        logger.info("%s was computed for another fit; replaying again", path)
    table, held_out = held_out_table(summary)
    predictors = [predictor_from_config(config) for config in configs]
    result = replay(table, predictors, sequential=True, device=device, bootstrap=bootstrap, seed=seed,
                    threads=threads)
    data = {**result.to_dict(), "summary_created_at": summary.get("created_at"), "candidate_configs": configs,
            "sequential": True,
            "held_out": held_out, "held_out_request_labels": list(table.request_labels)}
    write_text(path, json.dumps(data, indent=1, allow_nan=False))
    write_text(path.with_suffix(".md"), result.to_markdown())
    logger.info("kept the held-out replay in %s", path)
    return data


def _sha256(path: Path) -> str | None:
    """Return the file's sha256, or None when it does not exist."""
    from bpsim.models import file_sha256

    return file_sha256(path) if path.is_file() else None


def check_traces_unchanged(summary: dict, fit_dir: Path) -> dict[str, str]:
    """Reject an export whose traces differ from those ``bpsim fit`` hashed; return their sha256 by path.

    A summary written before fit recorded hashes passes and returns an empty dict.
    """
    hashed = summary.get("trace_sha256") or {}
    for path, digest in hashed.items():
        current = _sha256(Path(path))
        if current is None:
            raise ExportError(f"trace {path} that bpsim fit read for {fit_dir} is not found; run bpsim export from the "
                              "folder bpsim fit ran in, or fit again")
        if current != digest:
            raise ExportError(f"trace {path} changed since bpsim fit read it for {fit_dir} (sha256 {digest[:12]}... "
                              f"then, {current[:12]}... now); fit again")
    return hashed


def _trace_provenance(paths: list[Path], hashed: dict[str, str]) -> tuple[list[dict], list[dict], list[dict]]:
    """Describe the fitted traces, their models and sampling; ``hashed`` gives sha256 values already known."""
    from bpsim.traces import read_trace, trace_metadata

    traces, models, sampling = [], [], []
    for path in paths:
        table = read_trace(path)
        metadata = trace_metadata(table)
        requests = len(np.unique(table.column("request_id").to_numpy()))
        traces.append({"path": str(path), "sha256": hashed.get(str(path)) or _sha256(path), "requests": requests})
        model = {"target": metadata.get("target"), "draft": metadata.get("draft")}
        if model not in models:
            models.append(model)
        if metadata.get("sampling") not in sampling:
            sampling.append(metadata.get("sampling"))
    return traces, models, sampling


def _interval(policy: dict, key: str):
    value = policy.get(key)
    if value is None or value.get("value") is None:
        return None
    return [value["value"], value["low"], value["high"]]


def export_winner(fit_dir: Path | str, out: Path | str, device: str = "auto", bootstrap: int = 1000, seed: int = 0,
                  recompute: bool = False, threads: int | None = None) -> ExportedPredictor:
    """Pick the candidate with the best replayed tokens/s on held-out requests and write it to ``out``."""
    from bpsim.replay_steppers import max_draft_len_of

    fit_dir, out = Path(fit_dir), Path(out)
    summary = read_summary(fit_dir)
    hashed = check_traces_unchanged(summary, fit_dir)
    data = heldout_replay(fit_dir, summary, device=device, bootstrap=bootstrap, seed=seed, recompute=recompute,
                          threads=threads)
    predicted = [policy for policy in data["policies"] if policy["kind"] in ("predicted", "sequential")]
    if not predicted:
        raise ExportError(f"{fit_dir / HELDOUT_REPLAY} contains no predictor; replay again with --recompute")
    # On a tie (a predictor that never drafts) the mode without pre-drafting wins, because it needs no worker.
    winner = max(predicted, key=lambda policy: (policy["tokens_per_s"]["value"], policy["kind"] == "sequential"))
    best_plain = max((p for p in data["policies"] if p["kind"] in ("plain", "target")),
                     key=lambda policy: policy["tokens_per_s"]["value"])
    if winner["tokens_per_s"]["value"] < best_plain["tokens_per_s"]["value"]:
        logger.warning("the best predictor (%s) is slower on the held-out requests than %s; exporting it anyway",
                       winner["name"], best_plain["name"])
    predictor = predictor_from_config(winner["config"])
    traces, models, sampling = _trace_provenance([Path(p) for p in summary["traces"]], hashed)
    timing = [{"path": str(path), "sha256": hashed.get(str(path)) or _sha256(Path(path)), "requests": None}
              for path in summary.get("latency_traces", [])]
    expected = {"mode": data["mode"], "approximation": data["approximation"] or "",
                "held_out": bool(data["held_out"]), "held_out_requests": int(data["requests"]),
                "confidence": float(data["confidence"]), "best_plain_draft_len": int(data["best_plain_draft_len"])}
    expected.update({key: _interval(winner, key) for key in INTERVAL_KEYS})
    exported = ExportedPredictor(
        predictor_config=winner["config"], first_draft_len=int(winner["draft_len"]),
        max_draft_len=max(max_draft_len_of(predictor, int(winner["draft_len"])), int(winner["draft_len"])),
        latency=LatencyModel.from_dict(data["latency"]),
        fitted_on={"traces": traces, "latency_traces": timing, "models": models, "sampling": sampling,
                   "fit_dir": str(fit_dir), "summary_created_at": summary.get("created_at")},
        expected=expected, created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        bpsim_version=__version__, predraft=winner["kind"] == "predicted")
    validated = validate_exported(json.loads(json.dumps(exported.to_dict())), "the config being exported")
    write_text(out, json.dumps(validated.to_dict(), indent=1, allow_nan=False) + "\n")
    logger.info("exported %s to %s", winner["name"], out)
    return validated
