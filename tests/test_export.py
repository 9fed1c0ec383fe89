import json
import logging

import numpy as np
import pytest

from bpsim.cli import main
from bpsim.commands.fit import fit_traces
from bpsim.export import (EXPORT_VERSION, HELDOUT_REPLAY, ExportError, export_winner, load_exported,
                          validate_exported)
from bpsim.fitting import Rounds
from bpsim.predictors.base import predictor_from_config
from bpsim.synthetic import synthetic_trace, write_synthetic


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A fit of two small synthetic traces and the predictor exported from it."""
    folder = tmp_path_factory.mktemp("export")
    traces = [write_synthetic(folder / f"t{seed}.parquet", requests=6, rounds_per_request=12, draft_len=(2, 4),
                              confidence_strength=1.5, seed=seed, run_id=f"run-{seed}") for seed in (1, 2)]
    fit_dir = folder / "fit"
    fit_traces(traces, fit_dir, resamples=0, seed=0)
    out = folder / "predictor.json"
    result = export_winner(fit_dir, out, device="cpu", bootstrap=50)
    return {"folder": folder, "fit_dir": fit_dir, "out": out, "result": result, "traces": traces}


def test_export_picks_fastest_heldout_predictor(exported):
    replayed = json.loads((exported["fit_dir"] / HELDOUT_REPLAY).read_text())
    predicted = [policy for policy in replayed["policies"] if policy["kind"] == "predicted"]
    fastest = max(predicted, key=lambda policy: policy["tokens_per_s"]["value"])
    result = exported["result"]
    assert result.predictor_config == fastest["config"]
    assert result.expected["tokens_per_s"][0] == fastest["tokens_per_s"]["value"]
    assert result.expected["mode"] == "approximate"  # traces without profiles
    assert result.expected["held_out"] is True
    assert 0 < result.expected["held_out_requests"] < 12
    summary = json.loads((exported["fit_dir"] / "summary.json").read_text())
    scored = [entry["config"] for entry in summary["overall"]["predictors"]]
    assert result.predictor_config in scored


def test_export_round_trip_predicts_alike(exported):
    loaded = load_exported(exported["out"])
    assert loaded == exported["result"]
    fitted = predictor_from_config(exported["result"].predictor_config)
    reloaded = loaded.predictor()
    held_out = synthetic_trace(requests=5, rounds_per_request=15, draft_len=(2, 4), confidence_strength=1.5, seed=9)
    rounds = Rounds.from_tables([("held-out", held_out)])
    features = rounds.batch_features()
    expected_predicted, expected_next = fitted.predict_batch(features, rounds.accepted)
    predicted, next_len = reloaded.predict_batch(features, rounds.accepted)
    np.testing.assert_array_equal(predicted, expected_predicted)
    np.testing.assert_array_equal(next_len, expected_next)


def test_export_records_provenance(exported):
    data = json.loads(exported["out"].read_text())
    assert data["format"] == "bpsim-predictor"
    assert data["version"] == EXPORT_VERSION
    assert [trace["path"] for trace in data["fitted_on"]["traces"]] == [str(p) for p in exported["traces"]]
    assert all(len(trace["sha256"]) == 64 for trace in data["fitted_on"]["traces"])
    assert data["fitted_on"]["models"][0]["target"]["name"] == "synthetic-target"
    assert data["draft_len_policy"]["first_draft_len"] <= data["draft_len_policy"]["max_draft_len"]
    low, value, high = (data["expected"]["speedup_vs_target"][i] for i in (1, 0, 2))
    assert low <= value <= high


def test_export_reuses_kept_replay(exported, caplog):
    kept = exported["fit_dir"] / HELDOUT_REPLAY
    before = kept.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="bpsim.export"):
        again = export_winner(exported["fit_dir"], exported["folder"] / "again.json", device="cpu", bootstrap=50)
    assert kept.stat().st_mtime_ns == before
    assert "using the held-out replay kept" in caplog.text
    assert again.predictor_config == exported["result"].predictor_config


def modified(exported, change) -> dict:
    data = json.loads(exported["out"].read_text())
    change(data)
    return data


def test_load_rejects_newer_version(exported, tmp_path):
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(modified(exported, lambda d: d.update(version=EXPORT_VERSION + 1))))
    with pytest.raises(ExportError, match="'version' is 2, newer .* upgrade bpsim"):
        load_exported(path)


def test_load_rejects_newer_predictor_config(exported):
    data = modified(exported, lambda d: d["predictor"].update(version=7))
    with pytest.raises(ExportError, match="field 'predictor'.*version 7"):
        validate_exported(data)


def test_load_rejects_unknown_family(exported):
    data = modified(exported, lambda d: d["predictor"].update(family="crystal-ball"))
    with pytest.raises(ExportError, match="field 'predictor'.*unknown predictor family 'crystal-ball'"):
        validate_exported(data)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("latency"), "field 'latency' is missing"),
    (lambda d: d["draft_len_policy"].update(first_draft_len=99), "first_draft_len <= max_draft_len"),
    (lambda d: d["draft_len_policy"].update(first_draft_len="4"), "'first_draft_len' must be an integer"),
    (lambda d: d["latency"].update(verify_base_ms=-1.0), "'latency' is not a valid latency model"),
    (lambda d: d["latency"].pop("verify_base_ms"), "the latency model is missing verify_base_ms;"),
    (lambda d: d["expected"].update(speedup_vs_target=[1.0, 2.0, 3.0]), "low <= value <= high"),
    (lambda d: d["expected"].update(mode="guess"), "'mode' must be 'exact' or 'approximate'"),
    (lambda d: d["fitted_on"].update(traces=[]), "'traces' is empty"),
    (lambda d: d.update(comment="x"), "unknown field 'comment'"),
    (lambda d: d.update(format="other"), "'format' is 'other'"),
])
def test_load_rejects_invalid_field(exported, change, message):
    with pytest.raises(ExportError, match=message):
        validate_exported(modified(exported, change))


def test_load_missing_file_names_fix(tmp_path):
    with pytest.raises(ExportError, match="bpsim export FIT_DIR"):
        load_exported(tmp_path / "absent.json")


def test_export_cli_refuses_overwrite(exported, capsys):
    code = main(["export", str(exported["fit_dir"]), "--out", str(exported["out"]), "--device", "cpu"])
    assert code == 2
    assert "--force" in capsys.readouterr().err


def test_export_without_summary_rejected(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "p.json")]) == 2
    assert "run bpsim fit" in capsys.readouterr().err


def test_replay_cli_reads_exported_config(exported, capsys):
    code = main(["replay", str(exported["traces"][0]), "--config", str(exported["out"]), "--bootstrap", "10",
                 "--device", "cpu", "--draft-lens", "2,4"])
    assert code == 0
    assert exported["result"].predictor_config["family"] in capsys.readouterr().out


def test_fitted_pair_mismatch_names_both_pairs(exported):
    from types import SimpleNamespace

    from bpsim.commands.decode import fitted_pair_mismatch

    loaded = load_exported(exported["out"])
    fitted = next(entry for entry in loaded.fitted_on["models"] if entry["draft"] is not None)

    def pair(target_sha, draft_sha):
        return SimpleNamespace(target=SimpleNamespace(name="t", sha256=target_sha),
                               draft=SimpleNamespace(name="d", sha256=draft_sha))

    same = pair(fitted["target"].get("sha256"), fitted["draft"].get("sha256"))
    assert fitted_pair_mismatch(loaded, same) is None
    message = fitted_pair_mismatch(loaded, pair(fitted["target"].get("sha256"), "other"))
    assert message is not None
    assert "fitted on" in message
    assert "record, fit and export again" in message


def test_export_records_the_faster_predraft_mode(exported):
    loaded = load_exported(exported["out"])
    heldout = json.loads((exported["fit_dir"] / HELDOUT_REPLAY).read_text())
    kinds = {policy["kind"] for policy in heldout["policies"]}
    assert {"predicted", "sequential"} <= kinds
    winner = max((p for p in heldout["policies"] if p["kind"] in ("predicted", "sequential")),
                 key=lambda p: (p["tokens_per_s"]["value"], p["kind"] == "sequential"))
    assert loaded.predraft == (winner["kind"] == "predicted")


def test_export_turns_predraft_off_where_it_costs(exported, tmp_path):
    import shutil

    fit_dir = tmp_path / "fit"
    shutil.copytree(exported["fit_dir"], fit_dir)
    summary = json.loads((fit_dir / "summary.json").read_text())
    summary["latency"] = {**summary["latency"], "predraft_overlap": -1.0, "predraft_overhead_ms": 50.0}
    (fit_dir / "summary.json").write_text(json.dumps(summary))
    result = export_winner(fit_dir, tmp_path / "predictor.json", device="cpu", bootstrap=20, recompute=True)
    assert result.predraft is False
    assert load_exported(tmp_path / "predictor.json").predraft is False


def test_export_without_predraft_field_reads_as_predrafting(exported, tmp_path):
    data = json.loads(exported["out"].read_text())
    del data["predraft"]
    path = tmp_path / "older.json"
    path.write_text(json.dumps(data))
    assert load_exported(path).predraft is True


def test_load_rejects_mismatched_predraft_modes(exported, tmp_path):
    data = json.loads(exported["out"].read_text())
    data["predictor"] = {"version": 1, "family": "binomial",
                         "params": {"p": 0.5, "latency": data["latency"], "predraft": False}}
    data["predraft"] = True
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="chosen for predraft false"):
        load_exported(path)
    data["predraft"] = False
    path.write_text(json.dumps(data))
    assert load_exported(path).predraft is False


def test_export_rejects_trace_changed_since_fit(tmp_path):
    trace = write_synthetic(tmp_path / "t.parquet", requests=6, rounds_per_request=10, draft_len=(2, 4))
    fit_traces([trace], tmp_path / "fit", resamples=0)
    write_synthetic(trace, requests=6, rounds_per_request=10, draft_len=(2, 4), seed=5)
    with pytest.raises(ExportError, match="changed since bpsim fit read it"):
        export_winner(tmp_path / "fit", tmp_path / "predictor.json", device="cpu", bootstrap=10)
    assert not (tmp_path / "predictor.json").exists()
