"""The trace schema, a crash-tolerant Parquet writer and a validating reader.

A trace has one row per round of speculative (or target-only) decoding; docs/trace-schema.md
describes every column and the file metadata. A Parquet file is unreadable until its footer
is written, so the writer stores each flush as a complete part file in a hidden folder next to
the output. ``close`` merges the parts into the output and publishes it atomically. After a
killed run the parts stay behind and ``recover_trace`` merges them.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bpsim import __version__
from bpsim.atomic import atomic_path
from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METADATA_KEY = b"bpsim"  # schema metadata key whose value is the trace's JSON metadata

SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("request_id", pa.int32()),
    ("prompt_id", pa.string()),
    ("round", pa.int32()),
    ("position", pa.int32()),  # new tokens of the request before this round
    ("context_len", pa.int32()),  # prompt tokens + position
    ("draft_len", pa.int16()),
    ("predicted", pa.int16()),  # null without a predictor
    ("predraft_hit", pa.bool_()),  # null without pre-drafting
    ("accepted", pa.int16()),
    ("emitted", pa.int16()),
    ("tokens", pa.list_(pa.int32())),
    ("draft_tokens", pa.list_(pa.int32())),
    ("draft_second_tokens", pa.list_(pa.int32())),
    ("draft_max_prob", pa.list_(pa.float32())),
    ("draft_entropy", pa.list_(pa.float32())),
    ("draft_ms", pa.float64()),
    ("verify_ms", pa.float64()),
    ("predraft_ms", pa.float64()),  # null without pre-drafting
    ("round_ms", pa.float64()),
    ("finished", pa.bool_()),
])
NULLABLE_COLUMNS = frozenset({"predicted", "predraft_hit", "predraft_ms"})
DRAFT_LIST_COLUMNS = ("draft_tokens", "draft_second_tokens", "draft_max_prob", "draft_entropy")
PART_GLOB = "part-*.parquet"


class TraceError(BpsimError, ValueError):
    """A trace file that is missing, unreadable, of an unknown schema version or contains an invalid value."""


@dataclass(frozen=True)
class RoundRecord:
    """One round of one request: the trace columns apart from run_id, request_id and prompt_id."""

    round: int
    position: int
    context_len: int
    draft_len: int
    accepted: int
    emitted: int
    tokens: tuple[int, ...]
    draft_tokens: tuple[int, ...]
    draft_second_tokens: tuple[int, ...]
    draft_max_prob: tuple[float, ...]
    draft_entropy: tuple[float, ...]
    draft_ms: float
    verify_ms: float
    round_ms: float
    finished: bool
    predicted: int | None = None
    predraft_hit: bool | None = None
    predraft_ms: float | None = None


def parts_dir(path: Path | str) -> Path:
    """Return the hidden folder next to ``path`` where a writer keeps its flushed parts."""
    path = Path(path)
    return path.with_name(f".{path.name}.parts")


def trace_metadata(table: pa.Table) -> dict:
    """Return the JSON metadata of a trace table, or an empty dict when it has none."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _with_metadata(table: pa.Table, metadata: dict) -> pa.Table:
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def check_output(path: Path | str, overwrite: bool = False) -> None:
    """Raise unless a trace may be written to ``path``: no file there and no parts of an interrupted run.

    With ``overwrite`` both are allowed, and a writer then replaces the file and discards the parts.
    """
    path = Path(path)
    if overwrite:
        return
    if path.exists():
        raise TraceError(f"{path} already exists; choose another output path, or replace it with --force "
                         "(overwrite=True in Python)")
    if parts_dir(path).exists():
        raise TraceError(f"{parts_dir(path)} contains the parts of an interrupted run writing {path}; "
                         f"merge them with recover_trace({str(path)!r}) (bpsim record --recover --out {path}) "
                         "or discard them with --force (overwrite=True in Python)")


class TraceWriter:
    """Write a trace request by request, so that a killed run keeps every flushed request.

    ``metadata`` is stored in the file as JSON, completed with ``schema_version``,
    ``bpsim_version``, ``run_id`` and ``created_at``. Nothing is written over an existing
    output unless ``overwrite`` is true.
    """

    def __init__(self, path: Path | str, metadata: dict, overwrite: bool = False):
        self.path = Path(path)
        self.parts = parts_dir(self.path)
        self.overwrite = overwrite
        check_output(self.path, overwrite)
        if self.parts.exists():
            shutil.rmtree(self.parts)
        self.run_id = str(metadata.get("run_id") or uuid.uuid4().hex[:12])
        self.metadata = {
            **metadata,
            "schema_version": SCHEMA_VERSION,
            "bpsim_version": __version__,
            "run_id": self.run_id,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self._rows: list[dict] = []
        self._part_count = 0
        self.requests = 0

    def add_request(self, request_id: int, prompt_id: str, rounds: list[RoundRecord], flush: bool = True) -> None:
        """Queue every round of one request, then write them as a part file unless ``flush`` is false."""
        for record in rounds:
            self._rows.append({"run_id": self.run_id, "request_id": request_id, "prompt_id": prompt_id,
                               **asdict(record)})
        self.requests += 1
        if flush:
            self.flush()

    def flush(self) -> Path | None:
        """Write the queued rows as one complete part file and return its path, or None when nothing was queued."""
        if not self._rows:
            return None
        table = _with_metadata(pa.Table.from_pylist(self._rows, schema=SCHEMA), self.metadata)
        self.parts.mkdir(parents=True, exist_ok=True)
        part = self.parts / f"part-{self._part_count:06d}.parquet"
        with atomic_path(part, overwrite=False) as tmp:
            pq.write_table(table, tmp)
        self._part_count += 1
        self._rows = []
        return part

    def close(self, complete: bool = True) -> Path:
        """Flush, merge the parts into the output file, publish it atomically and delete the parts.

        ``complete=False`` marks a run that stopped before its last request, for example on
        Ctrl-C. The merged table is validated before it is published.
        """
        self.flush()
        table = _merge_parts(self.parts) if self.parts.exists() else SCHEMA.empty_table()
        metadata = {**self.metadata, "complete": complete, "requests": self.requests}
        table = validate_trace(_with_metadata(table, metadata), f"the trace being written to {self.path}")
        with atomic_path(self.path, overwrite=self.overwrite) as tmp:
            pq.write_table(table, tmp)
        if self.parts.exists():
            shutil.rmtree(self.parts)
        logger.info("wrote %d rounds of %d requests to %s", table.num_rows, self.requests, self.path)
        return self.path


def _merge_parts(folder: Path) -> pa.Table:
    parts = sorted(folder.glob(PART_GLOB))
    if not parts:
        raise TraceError(f"{folder} contains no part files ({PART_GLOB}), so nothing was flushed and there is nothing to recover")
    tables = []
    for part in parts:
        try:
            tables.append(pq.read_table(part))
        except (pa.ArrowInvalid, OSError) as error:
            raise TraceError(f"part file {part} is unreadable ({error}); delete it and recover the rest") from error
    metadata = trace_metadata(tables[0])
    merged = pa.concat_tables([table.replace_schema_metadata(None) for table in tables], promote_options="permissive")
    return _with_metadata(merged, metadata)


def read_parts(path: Path | str) -> pa.Table:
    """Read and validate the flushed parts of an interrupted run that was writing ``path``."""
    folder = parts_dir(path)
    if not folder.is_dir():
        raise TraceError(f"no parts folder {folder} for {path}; only a run that was interrupted leaves one")
    return validate_trace(_merge_parts(folder), str(folder))


def recover_trace(path: Path | str, overwrite: bool = False) -> Path:
    """Merge the parts an interrupted run left next to ``path`` into ``path`` and delete them.

    The recovered file is marked ``"complete": false`` in its metadata.
    """
    path = Path(path)
    table = read_parts(path)
    metadata = {**trace_metadata(table), "complete": False,
                "requests": len(pc.unique(table.column("request_id")))}
    try:
        with atomic_path(path, overwrite=overwrite) as tmp:
            pq.write_table(_with_metadata(table, metadata), tmp)
    except FileExistsError as error:
        raise TraceError(f"{path} already exists; replace it with the recovered parts using --force (overwrite=True in Python)") from error
    shutil.rmtree(parts_dir(path))
    logger.info("recovered %d rounds of %d requests into %s", table.num_rows, metadata["requests"], path)
    return path


def read_trace(path: Path | str) -> pa.Table:
    """Read a trace file, check its schema version, columns and values, and return it cast to ``SCHEMA``."""
    path = Path(path)
    if not path.is_file():
        hint = (f"; {parts_dir(path)} holds an interrupted run, recover it with bpsim record --recover --out {path}"
                if parts_dir(path).is_dir() else "; check the path or record one with bpsim record")
        raise TraceError(f"trace file {path} not found{hint}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise TraceError(f"{path} is not a readable Parquet file ({error}); re-record it with bpsim record") from error
    return validate_trace(table, str(path))


def validate_trace(table: pa.Table, source: str) -> pa.Table:
    """Check a trace table's version, columns and values, and return it cast to ``SCHEMA`` with its metadata.

    ``source`` names the file in error messages. Rows are numbered from 0 in file order.
    """
    metadata = _check_version(table, source)
    table = _check_columns(table, source)
    _check_values(table, source)
    return _with_metadata(table, metadata)


def _check_version(table: pa.Table, source: str) -> dict:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TraceError(f"{source} has no {METADATA_KEY.decode()!r} metadata, so it is not a bpsim trace; "
                         "record one with bpsim record")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as error:
        raise TraceError(f"{source}: the trace metadata is invalid JSON ({error.msg}); re-record the trace") from error
    version = metadata.get("schema_version") if isinstance(metadata, dict) else None
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise TraceError(f"{source}: unknown trace schema version {version!r} (this bpsim reads version "
                         f"{SCHEMA_VERSION}); re-record the trace with bpsim record")
    if version > SCHEMA_VERSION:
        raise TraceError(f"{source} uses trace schema version {version}, newer than version {SCHEMA_VERSION} "
                         "that this bpsim reads; upgrade bpsim to read it")
    return metadata


def _check_columns(table: pa.Table, source: str) -> pa.Table:
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise TraceError(f"{source} lacks the required columns {', '.join(missing)}; re-record the trace")
    columns = []
    for field in SCHEMA:
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise TraceError(f"{source}: column {field.name} has type {column.type}, expected {field.type} "
                             f"({error}); re-record the trace") from error
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _ints(table: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(table.column(name), 0).to_numpy().astype(np.int64)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return pc.fill_null(table.column(name), 0.0).to_numpy().astype(np.float64)


def _list_values(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return a list column's flattened values and the row each value came from."""
    column = table.column(name).combine_chunks()
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    rows = pc.list_parent_indices(column).to_numpy()
    return values, rows


def _check_values(table: pa.Table, source: str) -> None:
    """Raise ``TraceError`` naming the first row, in file order, that breaks a rule of the schema."""
    if table.num_rows == 0:
        return
    # One (first bad row, description) per broken rule. The smallest row is reported.
    problems: list[tuple[int, str]] = []

    def rule(bad: np.ndarray, describe) -> None:
        if bad.any():
            row = int(np.argmax(bad))
            problems.append((row, describe(row)))

    def element_rule(bad: np.ndarray, rows: np.ndarray, values: np.ndarray, describe) -> None:
        if bad.any():
            index = int(np.argmax(bad))
            problems.append((int(rows[index]), describe(values[index])))

    for name in SCHEMA.names:
        if name in NULLABLE_COLUMNS:
            continue
        column = table.column(name)
        rule(pc.is_null(column).to_numpy(zero_copy_only=False), lambda row, name=name: f"{name} is null")
        if pa.types.is_list(column.type):
            values = pc.list_flatten(column.combine_chunks())
            if values.null_count:
                rows = pc.list_parent_indices(column.combine_chunks()).to_numpy()
                bad = pc.is_null(values).to_numpy(zero_copy_only=False)
                problems.append((int(rows[np.argmax(bad)]), f"{name} contains a null"))

    draft_len, accepted, emitted = _ints(table, "draft_len"), _ints(table, "accepted"), _ints(table, "emitted")
    finished = pc.fill_null(table.column("finished"), False).to_numpy(zero_copy_only=False)
    for name in ("request_id", "round", "position", "draft_len"):
        values = _ints(table, name)
        rule(values < 0, lambda row, name=name, values=values: f"{name} = {values[row]} is negative")
    rule((accepted < 0) | (accepted > draft_len),
         lambda row: f"accepted = {accepted[row]} is outside 0..draft_len ({draft_len[row]})")
    predicted_null = pc.is_null(table.column("predicted")).to_numpy(zero_copy_only=False)
    predicted = _ints(table, "predicted")
    rule(~predicted_null & ((predicted < 0) | (predicted > draft_len)),
         lambda row: f"predicted = {predicted[row]} is outside 0..draft_len ({draft_len[row]})")
    token_count = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False)
    rule(emitted != token_count, lambda row: f"emitted = {emitted[row]} but tokens holds {token_count[row]} ids")
    rule((emitted < 1) | (emitted < accepted) | (emitted > accepted + 1),
         lambda row: f"emitted = {emitted[row]} is outside max(1, accepted)..accepted + 1 (accepted = {accepted[row]})")
    rule(~finished & (emitted != accepted + 1),
         lambda row: f"emitted = {emitted[row]} differs from accepted + 1 = {accepted[row] + 1} in an unfinished round")
    for name in DRAFT_LIST_COLUMNS:
        lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        rule(lengths != draft_len,
             lambda row, name=name, lengths=lengths: f"{name} holds {lengths[row]} values but draft_len is {draft_len[row]}")
    for name in ("draft_ms", "verify_ms", "round_ms", "predraft_ms"):
        values = _floats(table, name)
        rule(~np.isfinite(values) | (values < 0),
             lambda row, name=name, values=values: f"{name} = {values[row]} is not a finite time >= 0")

    for name in ("tokens", "draft_tokens", "draft_second_tokens"):
        values, rows = _list_values(table, name)
        element_rule(values < 0, rows, values, lambda value, name=name: f"{name} contains the negative id {value}")
    values, rows = _list_values(table, "draft_max_prob")
    element_rule(~((values >= 0) & (values <= 1)), rows, values,
                 lambda value: f"draft_max_prob contains {value}, outside [0, 1]")
    values, rows = _list_values(table, "draft_entropy")
    element_rule(~(np.isfinite(values) & (values >= 0)), rows, values,
                 lambda value: f"draft_entropy contains {value}, not a finite entropy >= 0")

    problems.extend(_request_problems(table, emitted, finished))
    if problems:
        row, description = min(problems, key=lambda problem: problem[0])
        raise TraceError(f"{source}: row {row}: {description}; the trace is corrupt or was written by a faulty "
                         "recorder, so re-record it")


def _request_problems(table: pa.Table, emitted: np.ndarray, finished: np.ndarray) -> list[tuple[int, str]]:
    """Check that each request's rows are contiguous, numbered from round 0 and add up their positions."""
    request = _ints(table, "request_id")
    rounds, position, context_len = _ints(table, "round"), _ints(table, "position"), _ints(table, "context_len")
    starts = np.r_[True, request[1:] != request[:-1]]  # (rows,) first row of each run of one request
    ends = np.r_[starts[1:], True]
    start_rows = np.flatnonzero(starts)
    segment = np.cumsum(starts) - 1  # (rows,) index of the run each row belongs to
    first = start_rows[segment]  # (rows,) first row of that run

    problems = []
    _, first_seen = np.unique(request[start_rows], return_index=True)
    repeated = np.setdiff1d(np.arange(len(start_rows)), first_seen)
    if repeated.size:
        row = int(start_rows[repeated.min()])
        problems.append((row, f"request_id {request[row]} appears again after other requests; "
                              "the rounds of one request must be contiguous"))
    expected_round = np.arange(len(request)) - first
    bad = rounds != expected_round
    if bad.any():
        row = int(np.argmax(bad))
        problems.append((row, f"round = {rounds[row]} but it is round {expected_round[row]} of request {request[row]}"))
    emitted_before = np.cumsum(emitted) - emitted
    expected_position = emitted_before - emitted_before[first]
    bad = position != expected_position
    if bad.any():
        row = int(np.argmax(bad))
        problems.append((row, f"position = {position[row]} but the earlier rounds of request {request[row]} "
                              f"emitted {expected_position[row]} tokens"))
    prompt_len = context_len - position
    bad = (prompt_len != prompt_len[first]) | (prompt_len < 1)
    if bad.any():
        row = int(np.argmax(bad))
        problems.append((row, f"context_len - position = {prompt_len[row]} is not the request's prompt length "
                              f"({prompt_len[first[row]]}, at least 1)"))
    bad = finished != ends
    if bad.any():
        row = int(np.argmax(bad))
        state = "finished before the request's last round" if finished[row] else "the request's last round is not finished"
        problems.append((row, state))
    return problems
