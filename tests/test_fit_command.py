import json
from pathlib import Path

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
