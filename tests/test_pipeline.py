"""The pipeline's report assembly and its resume rule, without running the models."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from bpsim.commands import pipeline


def test_section_demotes_headings_and_rebases_images(tmp_path):
    report = tmp_path / "fit" / "report.md"
    report.parent.mkdir()
    report.write_text("# Fits\n\ntext\n\n![plot](histogram.png)\n![abs](/abs.png)\n")
    section = pipeline._section("Fit", report)
    assert section.startswith("## Fit\n")
    assert "\n### Fits\n" in section
    assert "![plot](fit/histogram.png)" in section
    assert "![abs](/abs.png)" in section


def test_section_names_missing_report(tmp_path):
    assert "report.md is missing" in pipeline._section("Fit", tmp_path / "report.md")


def test_stage_skips_existing_output(tmp_path, monkeypatch):
    output = tmp_path / "done.json"
    output.write_text("{}")
    calls = []
    monkeypatch.setattr("bpsim.cli.main", lambda argv: calls.append(argv) or 0)
    timings = {}
    pipeline._stage("fit", output, ["fit"], timings)
    assert calls == []
    assert timings["fit"].startswith("skipped")


def test_stage_failure_names_stage(tmp_path, monkeypatch):
    monkeypatch.setattr("bpsim.cli.main", lambda argv: 2)
    with pytest.raises(pipeline.PipelineError, match="stage record failed with exit code 2"):
        pipeline._stage("record", tmp_path / "missing.parquet", ["record"], {})


def test_report_lists_stage_times(tmp_path):
    args = SimpleNamespace(out=Path(tmp_path), suite="mt-bench", limit=2, run=None)
    text = pipeline._report(tmp_path, args, {"record": "1.0 s"})
    assert "| record | 1.0 s |" in text
    assert "## Bench" in text


def test_stage_rerecords_interrupted_trace(tmp_path, monkeypatch):
    import json

    import pyarrow.parquet as pq

    from bpsim.synthetic import synthetic_trace

    output = tmp_path / "greedy-k4.parquet"
    table = synthetic_trace(requests=2, rounds_per_request=3)
    metadata = {**json.loads(table.schema.metadata[b"bpsim"]), "complete": False}
    pq.write_table(table.replace_schema_metadata({b"bpsim": json.dumps(metadata).encode()}), output)
    calls = []
    monkeypatch.setattr("bpsim.cli.main", lambda argv: calls.append(argv) or 0)
    pipeline._stage("record", output, ["record"], {})
    assert calls == [["record"]]
    assert (tmp_path / "greedy-k4.interrupted.parquet").is_file()
    assert not output.exists()


def test_stage_interrupt_names_output(tmp_path, monkeypatch):
    monkeypatch.setattr("bpsim.cli.main", lambda argv: 130)
    with pytest.raises(pipeline.PipelineError, match="interrupted in stage record"):
        pipeline._stage("record", tmp_path / "t.parquet", ["record"], {})


def test_prompt_counts_checked_before_stages(tmp_path):
    suite = tmp_path / "three.jsonl"
    suite.write_text("\n".join('{"prompt": "Say %d."}' % i for i in range(3)) + "\n")
    args = SimpleNamespace(suite=str(suite), limit=3, bench_limit=2, skip_bench=False)
    with pytest.raises(pipeline.PipelineError, match="leaving none for the bench"):
        pipeline.check_prompt_counts(args)
    pipeline.check_prompt_counts(SimpleNamespace(suite=str(suite), limit=3, bench_limit=2, skip_bench=True))
    pipeline.check_prompt_counts(SimpleNamespace(suite=str(suite), limit=2, bench_limit=2, skip_bench=False))


def test_interrupted_bench_names_kept_traces(tmp_path, monkeypatch):
    def interrupted(argv):
        (tmp_path / "bench" / "traces").mkdir(parents=True)
        (tmp_path / "bench" / "traces" / "target.parquet").write_bytes(b"")
        return 130

    monkeypatch.setattr("bpsim.cli.main", interrupted)
    with pytest.raises(pipeline.PipelineError, match=r"kept in \S*/bench\."):
        pipeline._stage("bench", tmp_path / "bench" / "bench.json", ["bench"], {}, partial=tmp_path / "bench")


def test_stage_keeps_partial_folder_aside(tmp_path, monkeypatch):
    (tmp_path / "bench" / "traces").mkdir(parents=True)
    calls = []
    monkeypatch.setattr("bpsim.cli.main", lambda argv: calls.append(argv) or 0)
    pipeline._stage("bench", tmp_path / "bench" / "bench.json", ["bench"], {}, partial=tmp_path / "bench")
    assert calls == [["bench"]]
    assert (tmp_path / "bench.interrupted" / "traces").is_dir()
