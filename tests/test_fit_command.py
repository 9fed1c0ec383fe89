import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpsim.cli import main
from bpsim.commands.fit import fit_traces
from bpsim.errors import BpsimError
from bpsim.predictors import predictor_from_config
from bpsim.synthetic import synthetic_trace, write_synthetic



def fit(tmp_path, *paths, extra=()):
    out = tmp_path / "out"
    code = main(["fit", *map(str, paths), "--out", str(out), "--bootstrap", "20", *extra])
    return code, out


def test_fit_writes_report_and_summary(tmp_path):
    trace = write_synthetic(tmp_path / "t.parquet", requests=8, rounds_per_request=20, draft_len=(3, 5),
                            confidence_strength=1.0)
    code, out = fit(tmp_path, trace)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["winner"]["name"] == summary["overall"]["predictors"][0]["name"]
    for entry in summary["overall"]["predictors"]:
        rebuilt = predictor_from_config(entry["config"])
        assert rebuilt.to_config() == entry["config"]
    report = (out / "report.md").read_text()
    assert "histogram-all_rounds-draft_len-3.png" in report
    assert (out / "histogram-all_rounds-draft_len-5.png").is_file()
    assert (out / "scores-all_rounds.png").is_file()


def test_different_pairs_rejected_unless_pooled(tmp_path, capsys):
    first = write_synthetic(tmp_path / "a.parquet", requests=4, rounds_per_request=10)
    second = write_synthetic(tmp_path / "b.parquet", requests=4, rounds_per_request=10, draft="other-draft")
    code, out = fit(tmp_path, first, second)
    assert code == 2
    assert "different model pairs" in capsys.readouterr().err
    assert not out.exists()
    code, out = fit(tmp_path, first, second, extra=["--pool"])
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["pooled"] is True


def test_empty_trace_rejected_by_name(tmp_path, capsys):
    path = tmp_path / "empty.parquet"
    pq.write_table(synthetic_trace(requests=2, rounds_per_request=5).slice(0, 0), path)
    code, out = fit(tmp_path, path)
    assert code == 2
    assert f"trace {path} contains no rounds" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("column, value", [("draft_ms", float("nan")), ("verify_ms", -1.0)])
def test_bad_latency_rejected_with_row(tmp_path, capsys, column, value):
    table = synthetic_trace(requests=2, rounds_per_request=5)
    values = table.column(column).to_numpy().copy()
    values[3] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    code, _ = fit(tmp_path, path)
    assert code == 2
    error = capsys.readouterr().err
    assert "row 3" in error
    assert column in error


@pytest.mark.parametrize("acceptance", [0.0, 1.0])
def test_extreme_traces_fit(tmp_path, acceptance):
    trace = write_synthetic(tmp_path / "t.parquet", requests=4, rounds_per_request=10, acceptance=acceptance)
    code, out = fit(tmp_path, trace)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rate = summary["overall"]["fits"]["capped-geometric"]["params"]["rate"]
    assert rate == acceptance


def test_single_round_trace_fits_in_sample(tmp_path):
    trace = write_synthetic(tmp_path / "t.parquet", requests=1, rounds_per_request=1)
    code, out = fit(tmp_path, trace)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["held_out"] is False
    assert "in-sample" in (out / "report.md").read_text()


def test_stratify_mixed_draft_len(tmp_path):
    trace = write_synthetic(tmp_path / "t.parquet", requests=8, rounds_per_request=20, draft_len=(2, 4))
    code, out = fit(tmp_path, trace, extra=["--stratify", "draft_len,mode"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strata"]) == {"draft_len=2, mode=greedy", "draft_len=4, mode=greedy"}
    fits = summary["strata"]["draft_len=2, mode=greedy"]["fits"]["capped-geometric"]
    assert list(fits["chi2_by_draft_len"]) == ["2"]


def test_unknown_stratum_rejected(tmp_path, capsys):
    trace = write_synthetic(tmp_path / "t.parquet", requests=2, rounds_per_request=3)
    code, _ = fit(tmp_path, trace, extra=["--stratify", "colour"])
    assert code == 2
    assert "unknown --stratify key colour" in capsys.readouterr().err


SHIPPED = Path(__file__).resolve().parent.parent / "traces"


def test_target_only_trace_informs_latency(tmp_path):
    summary = fit_traces([SHIPPED / "mt-bench-greedy-k4.parquet", SHIPPED / "mt-bench-greedy-target.parquet"],
                         tmp_path / "fit", resamples=20)
    latency = summary["overall"]["latency"]
    assert "verify_ms_per_token" not in latency["assumed"]
    assert latency["verify_ms_per_token"] > 0


def test_target_only_trace_alone_is_rejected(tmp_path):
    with pytest.raises(BpsimError, match="no speculative trace"):
        fit_traces([SHIPPED / "mt-bench-greedy-target.parquet"], tmp_path / "fit")


def predrafting_trace(path, overlap, **overrides):
    """A synthetic trace with exact timings whose every round pre-drafts the next one beside verification."""
    from bpsim.latency import LatencyModel, _next_draft_len

    table = synthetic_trace(requests=4, rounds_per_request=15, draft_len=(2, 4), latency_noise=0.0, seed=7,
                            **overrides)
    model = LatencyModel(draft_ms_per_token=2.0, draft_overhead_ms=0.5, verify_base_ms=10.0)  # the synthetic draft
    draft_len = table.column("draft_len").to_numpy()
    verify = table.column("verify_ms").to_numpy()
    following = _next_draft_len(table)
    compute = model.draft_ms(following)
    launched = following > 0
    round_ms = (table.column("draft_ms").to_numpy() + verify
                + np.where(launched, compute - overlap * np.minimum(compute, verify), 0.0))
    predraft_ms = pa.array(np.where(launched, 1.7 * compute, np.nan), type=pa.float64(), from_pandas=True)
    table = table.set_column(table.schema.get_field_index("predraft_ms"), "predraft_ms", predraft_ms)
    table = table.set_column(table.schema.get_field_index("round_ms"), "round_ms", pa.array(round_ms))
    assert (draft_len >= 0).all()
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("overlap", [0.5, -0.3])
def test_latency_traces_fit_overlap_but_not_acceptance(tmp_path, overlap):
    trace = write_synthetic(tmp_path / "t.parquet", requests=6, rounds_per_request=15, draft_len=(2, 4),
                            latency_noise=0.0)
    timing = predrafting_trace(tmp_path / "predraft.parquet", overlap)
    alone = fit_traces([trace], tmp_path / "alone", resamples=0)
    summary = fit_traces([trace], tmp_path / "fit", resamples=0, latency_paths=[timing])
    latency = json.loads((tmp_path / "fit" / "latency.json").read_text())
    assert latency == summary["latency"]
    assert latency["predraft_overlap"] == pytest.approx(overlap)
    assert "predraft_overlap" not in latency["assumed"]
    assert "predraft_overlap" in alone["latency"]["assumed"]
    assert summary["latency_traces"] == [str(timing)]
    # The latency trace's rounds are not fitted: the acceptance fits are those of the trace alone.
    assert summary["overall"]["train_rounds"] == alone["overall"]["train_rounds"]
    assert summary["overall"]["fits"] == alone["overall"]["fits"]


def test_latency_trace_of_another_pair_rejected(tmp_path, capsys):
    trace = write_synthetic(tmp_path / "t.parquet", requests=4, rounds_per_request=10)
    timing = predrafting_trace(tmp_path / "other.parquet", 0.5, draft="other-draft")
    code, _ = fit(tmp_path, trace, extra=("--latency-traces", str(timing)))
    assert code == 2
    error = capsys.readouterr().err
    assert str(timing) in error
    assert "other-draft" in error


def test_incomplete_trace_fits_with_warning(tmp_path, caplog):
    table = synthetic_trace(requests=6, rounds_per_request=10)
    metadata = {**json.loads(table.schema.metadata[b"bpsim"]), "complete": False, "requests": 6}
    path = tmp_path / "partial.parquet"
    pq.write_table(table.replace_schema_metadata({b"bpsim": json.dumps(metadata).encode()}), path)
    with caplog.at_level("WARNING"):
        fit_traces([path], tmp_path / "fit", resamples=0)
    assert any("incomplete" in record.message and str(path) in record.message for record in caplog.records)


def test_same_trace_twice_rejected(tmp_path, capsys):
    trace = write_synthetic(tmp_path / "t.parquet", requests=4, rounds_per_request=10)
    code, _ = fit(tmp_path, trace, tmp_path / "." / "t.parquet")
    assert code == 2
    assert "given twice" in capsys.readouterr().err
