"""Acceptance outcomes for replay: per request and output position, is the draft's token accepted?

Replay needs, for every request and every position j of the target's output, whether the
draft's greedy token at j equals the target's token there (``match``) and whether the draft's
second-best token does (``second_match``, the guessed correction token). A greedy acceptance
profile (``TRACE.profile.parquet``) contains both, teacher-forced, so a round starting at position s
with draft_len n accepts exactly the run of consecutive matches in ``match[s:s + n]`` and any
draft_len can be replayed exactly.

Everything else is approximate and says so:

- a sampling-mode profile gives ``accept_prob``, the chance that position j's draft token is
  accepted (sum over tokens of min(p, q)); replay draws the verdicts independently from it;
- a trace (one row per recorded round) fixes the verdicts of the positions its rounds judged.
  Bonus-token positions and target-only rounds were never judged; they get the trace's per-token
  acceptance rate.

Both are stored in one form: ``match_prob`` and ``second_prob``, 0 or 1 where the outcome is
known and a probability where it is not, and ``realize`` draws boolean outcomes from them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bpsim.errors import BpsimError
from bpsim.latency import LatencyModel, fit_from_table

logger = logging.getLogger(__name__)

PROFILE_SUFFIX = ".profile.parquet"
PROFILE_VERSION = 1  # the newest ``profile_version`` (bpsim.profile metadata) this reader understands
PROFILE_COLUMNS = ("request_id", "tokens", "match", "second_match")
METADATA_KEY = b"bpsim"


class ReplayInputError(BpsimError, ValueError):
    """A trace or profile that cannot be replayed: empty, unreadable, of mixed model pairs or inconsistent."""


@dataclass(frozen=True)
class AcceptanceTable:
    """Acceptance outcomes of many requests, padded to the longest; 2-d arrays are (requests, max_len)."""

    request_labels: tuple[str, ...]  # "trace path:request_id" per request
    length: np.ndarray  # (requests,) int, output tokens of each request
    prompt_len: np.ndarray  # (requests,) int, prompt tokens (context_len of the first round)
    match_prob: np.ndarray  # P(draft's token accepted at this position); exactly 0 or 1 where known
    second_prob: np.ndarray  # P(draft's second-best token is the target's token); 0 or 1 where known
    draft_max_prob: np.ndarray  # float32, NaN past each request's length
    draft_entropy: np.ndarray  # float32, NaN past each request's length
    approximation: str = ""  # why the outcomes are not exact; empty when they are
    sources: tuple[str, ...] = ()
    metadata: tuple[dict, ...] = ()
    latency: LatencyModel | None = None  # fitted from the traces' timings, when there were any

    def __post_init__(self):
        requests = len(self.length)
        if requests == 0:
            raise ReplayInputError("no requests to replay; the traces or profiles are empty")
        for name in ("match_prob", "second_prob", "draft_max_prob", "draft_entropy"):
            shape = getattr(self, name).shape
            if shape != (requests, self.max_len):
                raise ValueError(f"{name} has shape {shape}, expected ({requests}, {self.max_len})")

    @property
    def exact(self) -> bool:
        return not self.approximation

    @property
    def requests(self) -> int:
        return len(self.length)

    @property
    def max_len(self) -> int:
        return int(self.length.max())

    @property
    def tokens(self) -> int:
        return int(self.length.sum())

    def subset(self, requests) -> "AcceptanceTable":
        """Return the table of the requests at the given indices (a held-out split, for example)."""
        index = np.asarray(requests, dtype=np.int64)
        if len(index) == 0:
            raise ReplayInputError("the request subset is empty; choose at least one request")
        width = int(self.length[index].max())
        return AcceptanceTable(
            request_labels=tuple(self.request_labels[i] for i in index), length=self.length[index],
            prompt_len=self.prompt_len[index], match_prob=self.match_prob[index, :width],
            second_prob=self.second_prob[index, :width], draft_max_prob=self.draft_max_prob[index, :width],
            draft_entropy=self.draft_entropy[index, :width], approximation=self.approximation,
            sources=self.sources, metadata=self.metadata, latency=self.latency)


@dataclass(frozen=True)
class ReplayBatch:
    """Boolean acceptance outcomes on one device: each request of a table, realised ``samples`` times.

    Rows are request-major (row = request * samples + sample); 2-d tensors are (rows, max_len + 1)
    with a False/0 column past the end, so a gather at a request's length stays in bounds.
    """

    match: torch.Tensor  # bool
    second_match: torch.Tensor  # bool
    run: torch.Tensor  # long: consecutive matches starting at each position
    length: torch.Tensor  # (rows,) long
    prompt_len: torch.Tensor  # (rows,) long
    draft_max_prob: torch.Tensor  # float32, NaN past the length
    draft_entropy: torch.Tensor  # float32, NaN past the length
    group: torch.Tensor  # (rows,) long, the table's request index of each row
    samples: int

    @property
    def rows(self) -> int:
        return len(self.length)

    @property
    def width(self) -> int:
        return self.match.shape[1]


def run_lengths(match: torch.Tensor) -> torch.Tensor:
    """Return, for each position, the number of consecutive True values starting there; same shape as ``match``.

    ``match`` is (rows, width) bool. The count at j is (index of the next False at or after j) - j,
    found with a reversed running minimum instead of a loop over positions.
    """
    rows, width = match.shape
    index = torch.arange(width, device=match.device).expand(rows, width)
    false_at = torch.where(match, torch.full_like(index, width), index)  # (rows, width)
    next_false = torch.flip(torch.cummin(torch.flip(false_at, [1]), dim=1).values, [1])
    return next_false - index


def realize(table: AcceptanceTable, samples: int = 1, seed: int = 0, device: str | torch.device = "cpu"
            ) -> ReplayBatch:
    """Draw boolean outcomes from ``table`` (``samples`` draws per request) and move them to ``device``.

    Known outcomes (probability 0 or 1) are the same in every draw; an exact table needs one draw.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = torch.device(device)
    requests, width = table.requests, table.max_len + 1

    def padded(values: np.ndarray, fill) -> np.ndarray:
        out = np.full((requests, width), fill, dtype=values.dtype)
        out[:, :-1] = values
        return np.repeat(out, samples, axis=0)  # (rows, width), request-major

    generator = np.random.default_rng(seed)
    match_prob, second_prob = padded(table.match_prob, 0.0), padded(table.second_prob, 0.0)
    match = generator.random(match_prob.shape) < match_prob
    second = generator.random(second_prob.shape) < second_prob
    positions = np.arange(width)[None, :]
    inside = positions < np.repeat(table.length, samples)[:, None]
    match &= inside
    second &= inside
    match_tensor = torch.from_numpy(match).to(device)
    return ReplayBatch(
        match=match_tensor, second_match=torch.from_numpy(second).to(device), run=run_lengths(match_tensor),
        length=torch.from_numpy(np.repeat(table.length, samples).astype(np.int64)).to(device),
        prompt_len=torch.from_numpy(np.repeat(table.prompt_len, samples).astype(np.int64)).to(device),
        draft_max_prob=torch.from_numpy(padded(table.draft_max_prob.astype(np.float32), np.nan)).to(device),
        draft_entropy=torch.from_numpy(padded(table.draft_entropy.astype(np.float32), np.nan)).to(device),
        group=torch.arange(requests, device=device).repeat_interleave(samples), samples=samples)


# ---------------------------------------------------------------------------------------------
# Building tables from arrays, profiles and traces


def table_from_outcomes(match, second_match=None, *, prompt_len=None, draft_max_prob=None, draft_entropy=None,
                        labels=None, approximation: str = "", latency: LatencyModel | None = None,
                        sources=(), metadata=()) -> AcceptanceTable:
    """Build a table from per-request lists: ``match[i][j]`` is a bool (exact) or a probability.

    ``second_match`` defaults to all False (no correction-token guess is ever right).
    """
    requests = len(match)
    if requests == 0:
        raise ReplayInputError("no requests to replay; pass at least one request's outcomes")
    length = np.array([len(row) for row in match], dtype=np.int64)
    if (length == 0).any():
        empty = int(np.flatnonzero(length == 0)[0])
        raise ReplayInputError(f"request {empty} has no output tokens; drop it or record it again")
    width = int(length.max())

    def pad(rows, fill, dtype=np.float64) -> np.ndarray:
        out = np.full((requests, width), fill, dtype=dtype)
        for i, row in enumerate(rows):
            values = np.asarray(row, dtype=dtype)
            if len(values) != length[i]:
                raise ReplayInputError(f"request {i}: {len(values)} values for {length[i]} output tokens")
            out[i, :len(values)] = values
        return out

    match_prob = pad(match, 0.0)
    second_prob = pad(second_match, 0.0) if second_match is not None else np.zeros((requests, width))
    for name, values in (("match", match_prob), ("second_match", second_prob)):
        if ((values < 0) | (values > 1) | np.isnan(values)).any():
            raise ReplayInputError(f"{name} values must be booleans or probabilities in [0, 1]")
    fractional = ((match_prob > 0) & (match_prob < 1)).any() or ((second_prob > 0) & (second_prob < 1)).any()
    if fractional and not approximation:
        approximation = "outcomes given as probabilities; verdicts are drawn from them"
    return AcceptanceTable(
        request_labels=tuple(labels) if labels is not None else tuple(str(i) for i in range(requests)),
        length=length,
        prompt_len=np.zeros(requests, dtype=np.int64) if prompt_len is None else np.asarray(prompt_len, np.int64),
        match_prob=match_prob, second_prob=second_prob,
        draft_max_prob=pad(draft_max_prob, np.nan, np.float32) if draft_max_prob is not None
        else np.full((requests, width), np.nan, np.float32),
        draft_entropy=pad(draft_entropy, np.nan, np.float32) if draft_entropy is not None
        else np.full((requests, width), np.nan, np.float32),
        approximation=approximation, sources=tuple(sources), metadata=tuple(metadata), latency=latency)


def is_profile_path(path: Path | str) -> bool:
    return str(path).endswith(PROFILE_SUFFIX)


def trace_path_of_profile(path: Path | str) -> Path:
    """Return the trace a profile was computed from: ``X.profile.parquet`` -> ``X.parquet``."""
    path = Path(path)
    return path.with_name(path.name[: -len(PROFILE_SUFFIX)] + ".parquet")


def _metadata(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def sampling_mode(metadata: dict) -> str:
    """Return ``greedy`` or ``sample`` from a trace's or profile's ``sampling`` metadata (greedy when absent)."""
    sampling = metadata.get("sampling") or {}
    mode = sampling.get("mode")
    if mode in ("greedy", "sample"):
        return mode
    temperature = sampling.get("temperature")
    return "sample" if temperature not in (None, 0, 0.0) else "greedy"


def model_pair(metadata: dict) -> tuple[str | None, str | None]:
    def name(entry):
        return entry.get("name") if isinstance(entry, dict) else entry

    return name(metadata.get("target")), name(metadata.get("draft"))


def _is_target_only(trace: pa.Table) -> bool:
    """Whether a trace was recorded without a draft (every round has draft_len 0)."""
    return _metadata(trace).get("draft") is None and not pc.any(pc.greater(trace.column("draft_len"), 0)).as_py()


def _read_parquet(path: Path) -> pa.Table:
    if not path.is_file():
        raise ReplayInputError(f"{path} not found; pass a trace (.parquet) or a profile ({PROFILE_SUFFIX})")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ReplayInputError(f"{path} is not a readable Parquet file ({error})") from error


def _read_trace(path: Path) -> pa.Table:
    from bpsim.traces import read_trace

    table = read_trace(path)
    if table.num_rows == 0:
        raise ReplayInputError(f"trace {path} contains no rounds; record at least one request before replaying it")
    return table


def _list_matrix(column: pa.ChunkedArray, rows: int, width: int, fill, dtype) -> np.ndarray:
    """Return a list column as a (rows, width) matrix padded with ``fill``."""
    column = column.combine_chunks()
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(dtype)
    parents = pc.list_parent_indices(column).to_numpy()
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    starts = np.cumsum(lengths) - lengths
    within = np.arange(len(values)) - starts[parents]
    out = np.full((rows, width), fill, dtype=dtype)
    out[parents, within] = values
    return out


def profile_outcomes(path: Path) -> dict:
    """Read one acceptance profile into per-request arrays (see ``AcceptanceTable``)."""
    table = _read_parquet(path)
    missing = [name for name in PROFILE_COLUMNS if name not in table.column_names]
    if missing:
        raise ReplayInputError(f"{path} lacks the profile columns {', '.join(missing)}; "
                               "compute it again with bpsim profile")
    if table.num_rows == 0:
        raise ReplayInputError(f"profile {path} contains no requests; profile a trace with at least one request")
    metadata = _metadata(table)
    version = metadata.get("profile_version", PROFILE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > PROFILE_VERSION:
        raise ReplayInputError(f"{path} has profile_version {version!r}, but this bpsim reads version "
                               f"{PROFILE_VERSION}; upgrade bpsim or profile the trace again with this version")
    mode = sampling_mode(metadata)
    rows = table.num_rows
    length = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False).astype(np.int64)
    if (length == 0).any():
        row = int(np.flatnonzero(length == 0)[0])
        raise ReplayInputError(f"{path}: row {row} has no output tokens; profile the trace again")
    for name in ("match", "second_match", "accept_prob", "draft_max_prob", "draft_entropy"):
        if name not in table.column_names:
            continue
        counts = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(counts != length)
        if len(bad):
            raise ReplayInputError(f"{path}: row {bad[0]}: {name} has {counts[bad[0]]} values for "
                                   f"{length[bad[0]]} tokens; profile the trace again")
    width = int(length.max())
    match = _list_matrix(table.column("match"), rows, width, False, bool).astype(np.float64)
    second = _list_matrix(table.column("second_match"), rows, width, False, bool).astype(np.float64)
    approximation = ""
    if mode == "sample":
        if "accept_prob" not in table.column_names:
            raise ReplayInputError(f"{path} is a sampling-mode profile without accept_prob; profile the trace again")
        match = _list_matrix(table.column("accept_prob"), rows, width, 0.0, np.float64)
        if ((match < 0) | (match > 1) | np.isnan(match)).any():
            raise ReplayInputError(f"{path}: accept_prob values must lie in [0, 1]")
        approximation = ("sampling-mode profile: verdicts drawn independently from accept_prob along the "
                         "target's recorded tokens")

    def optional(name):
        if name not in table.column_names:
            return np.full((rows, width), np.nan, np.float32)
        return _list_matrix(table.column(name), rows, width, np.nan, np.float32)

    prompt_len = None
    if "prompt_len" in table.column_names:
        prompt_len = table.column("prompt_len").to_numpy(zero_copy_only=False).astype(np.int64)
    return {"request_id": table.column("request_id").to_numpy(zero_copy_only=False), "length": length,
            "prompt_len": prompt_len, "match_prob": match, "second_prob": second,
            "draft_max_prob": optional("draft_max_prob"), "draft_entropy": optional("draft_entropy"),
            "approximation": approximation, "metadata": metadata}


def trace_outcomes(table: pa.Table, source: str) -> dict:
    """Rebuild per-position outcomes from a trace's rounds; unjudged positions get the trace's rates.

    In a round with draft_len n and accepted a, the a accepted positions matched, and when a < n
    the next one did not, with the correction guess right when the draft's second-best token is
    the emitted one. The bonus position (a == n) and target-only rounds were never judged.
    """
    rows = table.num_rows
    request = table.column("request_id").to_numpy().astype(np.int64)
    position = table.column("position").to_numpy().astype(np.int64)
    context_len = table.column("context_len").to_numpy().astype(np.int64)
    draft_len = table.column("draft_len").to_numpy().astype(np.int64)
    accepted = table.column("accepted").to_numpy().astype(np.int64)
    emitted = table.column("emitted").to_numpy().astype(np.int64)
    width = max(int(draft_len.max()) + 1, 1)
    tokens = _list_matrix(table.column("tokens"), rows, width, -1, np.int64)  # (rounds, width)
    second_tokens = _list_matrix(table.column("draft_second_tokens"), rows, width, -2, np.int64)
    max_prob = _list_matrix(table.column("draft_max_prob"), rows, width, np.nan, np.float32)
    entropy = _list_matrix(table.column("draft_entropy"), rows, width, np.nan, np.float32)

    # Requests in file order; each request's output is the concatenation of its rounds' tokens.
    starts = np.r_[True, request[1:] != request[:-1]]
    index = np.cumsum(starts) - 1  # (rounds,) request index
    requests = int(index[-1]) + 1
    length = np.bincount(index, weights=emitted, minlength=requests).astype(np.int64)
    prompt_len = (context_len - position)[starts]
    max_len = int(length.max())
    match = np.full((requests, max_len), np.nan)
    second = np.full((requests, max_len), np.nan)
    probs = np.full((requests, max_len), np.nan, np.float32)
    entropies = np.full((requests, max_len), np.nan, np.float32)

    # Per round, the judged offsets are 0..min(accepted, draft_len - 1), all inside the emitted tokens.
    offsets = np.arange(width)[None, :]  # (1, width)
    judged = offsets <= np.minimum(accepted, draft_len - 1)[:, None]  # (rounds, width)
    judged &= offsets < emitted[:, None]
    round_index, offset = np.nonzero(judged)
    target_position = position[round_index] + offset
    request_index = index[round_index]
    verdict = offset < accepted[round_index]
    match[request_index, target_position] = verdict
    guess_right = second_tokens[round_index, offset] == tokens[round_index, offset]
    second[request_index, target_position] = np.where(verdict, 0.0, guess_right)
    probs[request_index, target_position] = max_prob[round_index, offset]
    entropies[request_index, target_position] = entropy[round_index, offset]

    inside = np.arange(max_len)[None, :] < length[:, None]
    known = inside & ~np.isnan(match)
    rejected = known & (match == 0)
    rate = float(np.nanmean(match[known])) if known.any() else 0.0
    second_rate = float(second[rejected].mean()) if rejected.any() else 0.0
    unknown_share = 1.0 - known.sum() / inside.sum()
    match = np.where(np.isnan(match), rate, match)
    second = np.where(np.isnan(second), second_rate, second)
    probs = np.where(np.isnan(probs) & inside, np.nanmean(probs[known]) if known.any() else np.nan, probs)
    entropies = np.where(np.isnan(entropies) & inside,
                         np.nanmean(entropies[known]) if known.any() else np.nan, entropies)
    approximation = (f"rebuilt from trace rounds: {unknown_share:.1%} of positions (bonus tokens and "
                     f"target-only rounds) were never judged and use the trace's acceptance rate {rate:.3f}")
    if sampling_mode(_metadata(table)) == "sample":
        approximation += ("; sampling-mode trace: the recorded verdicts are one draw, kept as if they were "
                          "fixed outcomes")
    return {"request_id": request[starts], "length": length, "prompt_len": prompt_len, "match_prob": match,
            "second_prob": second, "draft_max_prob": probs, "draft_entropy": entropies,
            "approximation": approximation, "metadata": _metadata(table)}


def load_acceptance(paths, latency: LatencyModel | None = None, latency_paths=()) -> AcceptanceTable:
    """Read traces and profiles into one table; fit the latency model from their traces' timings.

    A profile ``X.profile.parquet`` takes its timings and prompt lengths from ``X.parquet`` when
    that file exists. Files of different target/draft pairs cannot be replayed together.
    ``latency_paths`` are traces of the same pair whose timings join the latency fit and whose
    accepted counts are not replayed, for example a pre-drafting trace.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ReplayInputError("no traces or profiles given; pass at least one file")
    # A trace given together with its own profile would count its requests twice; the profile is exact.
    profiled = {trace_path_of_profile(p) for p in paths if is_profile_path(p)}
    for path in paths:
        if path in profiled:
            logger.info("replaying %s from its profile next to it, which is exact", path)
    paths = [p for p in paths if p not in profiled]
    parts, traces, pairs, target_only = [], [], {}, {}
    for path in paths:
        if is_profile_path(path):
            part = profile_outcomes(path)
            trace_path = trace_path_of_profile(path)
            if trace_path.is_file():
                trace = _read_trace(trace_path)
                traces.append(trace)
                if part["prompt_len"] is None:
                    part["prompt_len"] = _prompt_lengths(trace, part["request_id"], path)
            elif latency is None:
                logger.warning("%s has no trace %s next to it, so its timings are unknown", path, trace_path)
        else:
            trace = _read_trace(path)
            traces.append(trace)
            if _is_target_only(trace):
                # A target-only trace informs the latency model (single-token verify passes) and
                # holds no acceptance to replay.
                target_only[str(path)] = model_pair(_metadata(trace))[0]
                continue
            part = trace_outcomes(trace, str(path))
        if part["prompt_len"] is None:
            part["prompt_len"] = np.zeros(len(part["length"]), dtype=np.int64)
        part["source"] = str(path)
        # Requests are named after their trace, so a profile's requests match the trace's.
        part["label_source"] = str(trace_path_of_profile(path)) if is_profile_path(path) else str(path)
        pairs[str(path)] = model_pair(part["metadata"])
        parts.append(part)
    if len(set(pairs.values())) > 1:
        listing = "; ".join(f"{path}: target {pair[0]}, draft {pair[1]}" for path, pair in pairs.items())
        raise ReplayInputError(f"the files come from different model pairs ({listing}); replay one pair at a time")
    if not parts:
        raise ReplayInputError(f"nothing to replay in {', '.join(map(str, paths))}: target-only traces only time the "
                               "target; add a speculative trace or its profile")
    targets = {pair[0] for pair in pairs.values()}
    for path, target in target_only.items():
        if target not in targets:
            raise ReplayInputError(f"target-only trace {path} was recorded with target {target}, but the other files "
                                   f"use {', '.join(sorted(map(str, targets)))}; replay one target at a time")
    given = {Path(p).resolve() for p in paths} | {trace_path_of_profile(p).resolve() for p in paths if is_profile_path(p)}
    for path in map(Path, latency_paths):
        if is_profile_path(path):
            raise ReplayInputError(f"latency trace {path} is a profile; pass the trace it was made from "
                                   f"({trace_path_of_profile(path)})")
        if path.resolve() in given:
            raise ReplayInputError(f"latency trace {path} is also replayed (itself or through its profile), so its "
                                   "timings would count twice; drop it from --latency-traces")
        trace = _read_trace(path)
        if trace.num_rows == 0:
            raise ReplayInputError(f"latency trace {path} contains no rounds; record at least one request")
        target, draft = model_pair(_metadata(trace))
        expected = set(pairs.values())
        if (target, draft) not in expected and not (draft is None and target in targets):
            listing = ", ".join(f"target {t}, draft {d}" for t, d in sorted(expected, key=str))
            raise ReplayInputError(f"latency trace {path} was recorded with target {target}, draft {draft}, but the "
                                   f"replayed files use {listing}; time the same pair")
        traces.append(trace)
    if latency is None:
        if not traces:
            raise ReplayInputError("no trace timings to fit a latency model on; put the trace next to its profile "
                                   "or pass a latency model (--latency FILE)")
        latency = fit_from_table(pa.concat_tables([t.replace_schema_metadata(None) for t in traces],
                                                  promote_options="permissive"))
    return _concatenate(parts, latency)


def _prompt_lengths(trace: pa.Table, request_ids: np.ndarray, path: Path) -> np.ndarray:
    request = trace.column("request_id").to_numpy().astype(np.int64)
    prompt = (trace.column("context_len").to_numpy() - trace.column("position").to_numpy()).astype(np.int64)
    by_request = dict(zip(request.tolist(), prompt.tolist()))
    missing = [int(r) for r in request_ids if int(r) not in by_request]
    if missing:
        raise ReplayInputError(f"{path}: request_id {missing[0]} is not in its trace; profile the trace again")
    return np.array([by_request[int(r)] for r in request_ids], dtype=np.int64)


def _concatenate(parts: list[dict], latency: LatencyModel) -> AcceptanceTable:
    width = max(int(part["length"].max()) for part in parts)

    def stack(name, fill, dtype):
        blocks = []
        for part in parts:
            values = part[name]
            block = np.full((len(values), width), fill, dtype=dtype)
            block[:, :values.shape[1]] = values
            blocks.append(block)
        return np.concatenate(blocks)

    approximations = sorted({part["approximation"] for part in parts if part["approximation"]})
    return AcceptanceTable(
        request_labels=tuple(f"{part['label_source']}:{r}" for part in parts for r in part["request_id"].tolist()),
        length=np.concatenate([part["length"] for part in parts]),
        prompt_len=np.concatenate([part["prompt_len"] for part in parts]),
        match_prob=stack("match_prob", 0.0, np.float64), second_prob=stack("second_prob", 0.0, np.float64),
        draft_max_prob=stack("draft_max_prob", np.nan, np.float32),
        draft_entropy=stack("draft_entropy", np.nan, np.float32),
        approximation="; ".join(approximations), sources=tuple(part["source"] for part in parts),
        metadata=tuple(part["metadata"] for part in parts), latency=latency)
