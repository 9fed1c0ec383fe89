"""The trace writer and reader: round trip, killed-run recovery, version and value checks, overwrite refusal."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpsim.traces import (
    METADATA_KEY,
    SCHEMA,
    SCHEMA_VERSION,
    RoundRecord,
    TraceError,
    TraceWriter,
    parts_dir,
    read_parts,
    read_trace,
    recover_trace,
    trace_metadata,
)

METADATA = {"target": {"name": "t", "sha256": "0"}, "draft": {"name": "d", "sha256": "1"},
            "policy": {"kind": "speculative", "draft_len": 3}, "suite": "test"}


def make_rounds(accepted: list[int], draft_len: int = 3, prompt_len: int = 5) -> list[RoundRecord]:
    """Consistent rounds of one request that accept the given counts; the last round is finished."""
    rounds, position = [], 0
    for index, count in enumerate(accepted):
        drafts = tuple(range(10 + index, 10 + index + draft_len))
        tokens = drafts[:count] + (99,)
        rounds.append(RoundRecord(
            round=index, position=position, context_len=prompt_len + position, draft_len=draft_len,
            accepted=count, emitted=len(tokens), tokens=tokens, draft_tokens=drafts,
            draft_second_tokens=tuple(token + 1000 for token in drafts), draft_max_prob=(0.9, 0.5, 0.25)[:draft_len],
            draft_entropy=(0.1, 1.0, 2.0)[:draft_len], draft_ms=1.5, verify_ms=4.0, round_ms=5.75,
            finished=index == len(accepted) - 1, predicted=min(count + 1, draft_len)))
        position += len(tokens)
    return rounds


def write_trace(path, requests: int = 3) -> None:
    writer = TraceWriter(path, METADATA)
    for request in range(requests):
        writer.add_request(request, f"test/{request}", make_rounds([request % 4, 3, 0]))
    writer.close()


def corrupt(path, column: str, row: int, value) -> None:
    """Rewrite ``path`` with ``column[row]`` replaced by ``value``, keeping the metadata."""
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    index = table.column_names.index(column)
    table = table.set_column(index, table.field(column), pa.array(values, type=table.field(column).type))
    pq.write_table(table, path)


def test_round_trip(tmp_path):
    path = tmp_path / "trace.parquet"
    write_trace(path)
    table = read_trace(path)
    assert table.schema.remove_metadata() == SCHEMA
    assert table.num_rows == 9
    assert table.column("request_id").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert table.column("tokens").to_pylist()[:2] == [[99], [11, 12, 13, 99]]
    assert table.column("predraft_ms").null_count == 9
    metadata = trace_metadata(table)
    assert metadata["schema_version"] == SCHEMA_VERSION
    assert metadata["policy"] == METADATA["policy"]
    assert metadata["complete"] is True
    assert metadata["requests"] == 3
    assert len(set(table.column("run_id").to_pylist())) == 1
    assert not parts_dir(path).exists()


def test_empty_trace_round_trip(tmp_path):
    path = tmp_path / "empty.parquet"
    TraceWriter(path, METADATA).close()
    assert read_trace(path).num_rows == 0


def test_overwrite_refused(tmp_path):
    path = tmp_path / "trace.parquet"
    write_trace(path, requests=1)
    with pytest.raises(TraceError, match="already exists"):
        TraceWriter(path, METADATA)
    writer = TraceWriter(path, METADATA, overwrite=True)
    writer.add_request(0, "test/0", make_rounds([1]))
    writer.close()
    assert read_trace(path).num_rows == 1


def test_killed_run_recovered(tmp_path):
    """A writer killed with SIGKILL after two flushed requests leaves parts that recover into a trace."""
    path = tmp_path / "killed.parquet"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from bpsim.traces import TraceWriter
        from test_traces import METADATA, make_rounds
        writer = TraceWriter({str(path)!r}, METADATA)
        writer.add_request(0, "test/0", make_rounds([1, 2]))
        writer.add_request(1, "test/1", make_rounds([0, 3]))
        writer.add_request(2, "test/2", make_rounds([3]), flush=False)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    assert not path.exists()
    (parts_dir(path) / ".part-000002.parquet.tmp").write_bytes(b"half a file")  # a write cut short

    with pytest.raises(TraceError, match="recover"):
        read_trace(path)
    with pytest.raises(TraceError, match="interrupted run"):
        TraceWriter(path, METADATA)
    assert read_parts(path).column("request_id").to_pylist() == [0, 0, 1, 1]
    recover_trace(path)
    table = read_trace(path)
    assert table.column("request_id").to_pylist() == [0, 0, 1, 1]
    assert trace_metadata(table)["complete"] is False
    assert trace_metadata(table)["requests"] == 2
    assert not parts_dir(path).exists()


def test_overwrite_discards_parts(tmp_path):
    path = tmp_path / "trace.parquet"
    stale = TraceWriter(path, METADATA)
    stale.add_request(0, "test/0", make_rounds([2]))
    writer = TraceWriter(path, METADATA, overwrite=True)
    writer.add_request(5, "test/5", make_rounds([1]))
    writer.close()
    assert read_trace(path).column("request_id").to_pylist() == [5]


def test_missing_file_named(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "absent.parquet")


def test_not_parquet_rejected(tmp_path):
    path = tmp_path / "text.parquet"
    path.write_text("not parquet")
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        read_trace(path)


@pytest.mark.parametrize("version,message", [(SCHEMA_VERSION + 1, "upgrade bpsim"), (0, "unknown trace schema version"),
                                             ("1", "unknown trace schema version"), (None, "unknown trace schema version")])
def test_bad_schema_version(tmp_path, version, message):
    path = tmp_path / "trace.parquet"
    write_trace(path, requests=1)
    table = pq.read_table(path)
    metadata = {**trace_metadata(table), "schema_version": version}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), path)
    with pytest.raises(TraceError, match=message) as error:
        read_trace(path)
    assert str(path) in str(error.value)


def test_missing_metadata_rejected(tmp_path):
    path = tmp_path / "trace.parquet"
    write_trace(path, requests=1)
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    with pytest.raises(TraceError, match="not a bpsim trace"):
        read_trace(path)


def test_missing_column_named(tmp_path):
    path = tmp_path / "trace.parquet"
    write_trace(path, requests=1)
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["draft_entropy", "round_ms"]), path)
    with pytest.raises(TraceError, match="draft_entropy, round_ms"):
        read_trace(path)


@pytest.mark.parametrize("column,value,message", [
    ("accepted", 4, "accepted = 4 is outside 0..draft_len"),
    ("accepted", -1, "accepted = -1"),
    ("emitted", 3, "emitted = 3 but tokens holds 4 ids"),
    ("tokens", [11, 12, 99], "emitted = 4 but tokens holds 3 ids"),
    ("draft_tokens", [10, 11], "draft_tokens holds 2 values but draft_len is 3"),
    ("draft_max_prob", [0.5, 1.5, 0.2], "draft_max_prob contains 1.5"),
    ("draft_entropy", [0.5, float("nan"), 0.2], "draft_entropy contains nan"),
    ("verify_ms", -2.0, "verify_ms = -2.0 is not a finite time"),
    ("round_ms", float("inf"), "round_ms = inf"),
    ("draft_ms", None, "draft_ms is null"),
    ("predicted", 7, "predicted = 7 is outside 0..draft_len"),
    ("position", 3, "position = 3 but the earlier rounds"),
    ("round", 0, "round = 0 but it is round 1"),
    ("finished", True, "finished before the request's last round"),
])
def test_bad_value_names_file_and_row(tmp_path, column, value, message):
    path = tmp_path / "trace.parquet"
    write_trace(path, requests=3)
    corrupt(path, column, 4, value)  # row 4 is round 1 of request 1, which accepted 3 drafts
    with pytest.raises(TraceError) as error:
        read_trace(path)
    assert f"{path}: row 4: " in str(error.value)
    assert message in str(error.value)


def test_split_request_rejected(tmp_path):
    path = tmp_path / "trace.parquet"
    writer = TraceWriter(path, METADATA)
    for request in (0, 1, 0):
        writer.add_request(request, f"test/{request}", make_rounds([1, 2]))
    with pytest.raises(TraceError, match="row 4: request_id 0 appears again"):
        writer.close()


def test_reader_reports_first_bad_row(tmp_path):
    path = tmp_path / "trace.parquet"
    write_trace(path, requests=3)
    corrupt(path, "verify_ms", 7, -1.0)
    corrupt(path, "draft_max_prob", 2, [2.0, 0.5, 0.2])
    with pytest.raises(TraceError, match="row 2: draft_max_prob"):
        read_trace(path)


def test_unfinished_short_round_rejected(tmp_path):
    path = tmp_path / "trace.parquet"
    writer = TraceWriter(path, METADATA)
    rounds = make_rounds([1, 1])
    cut = RoundRecord(**{**rounds[0].__dict__, "tokens": rounds[0].tokens[:1], "emitted": 1})
    writer.add_request(0, "test/0", [cut, RoundRecord(**{**rounds[1].__dict__, "position": 1, "context_len": 6})])
    with pytest.raises(TraceError, match="row 0: emitted = 1 differs from accepted \\+ 1"):
        writer.close()
