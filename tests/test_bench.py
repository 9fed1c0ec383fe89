"""The decode and bench commands: streaming, traces, the bench's statistics, its simulator comparison and Ctrl-C."""

import json
import math

import numpy as np
import pytest

import bpsim.branch
from bpsim import __version__, cli
from bpsim.commands.bench import (BenchPolicy, Run, attach_predictions, lossless_check, plain_draft_len_of, rotated,
                                  summarise, trace_name)
from bpsim.commands.decode import RequestSummary, TextStream
from bpsim.decoding import DecodeConfig, SpeculativeDecoder
from bpsim.export import ExportedPredictor, load_exported
from bpsim.latency import LatencyModel
from bpsim.predictors.static import StaticPredictor
from bpsim.prompts import Prompt, encode_prompt
from bpsim.traces import read_trace, trace_metadata


def write_exported(path, predictor, first_draft_len=3, best_plain_draft_len=3):
    """Write a valid exported predictor file, as bpsim export would, for ``predictor``."""
    exported = ExportedPredictor(
        predictor_config=predictor.to_config(), first_draft_len=first_draft_len, max_draft_len=first_draft_len + 2,
        latency=LatencyModel(draft_ms_per_token=2.0, verify_base_ms=20.0),
        fitted_on={"traces": [{"path": "traces/test.parquet", "sha256": None, "requests": 1}],
                   "models": [{"target": "smollm2-135m", "draft": "smollm2-135m-draft4"}],
                   "sampling": [{"mode": "greedy"}], "fit_dir": "fit", "summary_created_at": None},
        expected={"mode": "exact", "approximation": "", "held_out": True, "held_out_requests": 1, "confidence": 0.95,
                  "best_plain_draft_len": best_plain_draft_len, "tokens_per_s": [10.0, 9.0, 11.0],
                  "speedup_vs_target": [1.2, 1.1, 1.3], "speedup_vs_best_plain": [1.05, 1.0, 1.1], "hit_rate": None},
        created_at="2025-01-01T00:00:00+00:00", bpsim_version=__version__)
    path.write_text(json.dumps(exported.to_dict()))
    return load_exported(path)


@pytest.fixture
def use_real_pair(real_pair, monkeypatch):
    """Make the commands load the session's model pair instead of the names in the exported file."""
    import bpsim.models

    monkeypatch.setattr(bpsim.models, "load_pair", lambda *args, **kwargs: real_pair)
    return real_pair


# ---------------------------------------------------------------------------------------------
# bpsim decode


@pytest.mark.slow
def test_decode_streams_target_text(use_real_pair, tmp_path, capsys):
    pair = use_real_pair
    config = tmp_path / "predictor.json"
    write_exported(config, StaticPredictor("all", draft_len=3))
    trace = tmp_path / "decode.parquet"
    text = "Name three colours."

    assert cli.main(["decode", "--config", str(config), "--prompt", text, "--max-new-tokens", "12",
                     "--out", str(trace)]) == 0
    output = capsys.readouterr()

    ids = encode_prompt(pair.tokenizer, Prompt("prompt/0", text))
    reference = SpeculativeDecoder.from_pair(pair, DecodeConfig(draft_len=0, max_new_tokens=12)).generate(ids)
    assert output.out == pair.tokenizer.decode(list(reference.tokens), skip_special_tokens=True) + "\n"
    assert "[prompt/0] " in output.err
    assert "pre-draft hit rate" in output.err
    assert "tokens/s" in output.err

    table = read_trace(trace)
    metadata = trace_metadata(table)
    assert metadata["complete"] is True
    assert metadata["prompt_tokens"] == {"prompt/0": ids}
    assert metadata["policy"]["predictor"] == StaticPredictor("all", draft_len=3).to_config()
    finished = np.asarray(table.column("finished").to_pylist())
    assert None not in table.column("predicted").to_pylist()
    assert None not in np.asarray(table.column("predraft_hit").to_pylist(), dtype=object)[~finished].tolist()
    assert None not in np.asarray(table.column("predraft_ms").to_pylist(), dtype=object)[~finished].tolist()
    emitted = [token for tokens in table.column("tokens").to_pylist() for token in tokens]
    assert emitted == list(reference.tokens)


def test_decode_rejects_limit_with_prompt(tmp_path, capsys):
    config = tmp_path / "predictor.json"
    write_exported(config, StaticPredictor("all", draft_len=3))
    assert cli.main(["decode", "--config", str(config), "--prompt", "hi", "--limit", "2"]) == 2
    assert "--limit applies to --suite only" in capsys.readouterr().err


def test_decode_reports_missing_config(tmp_path, capsys):
    assert cli.main(["decode", "--config", str(tmp_path / "missing.json"), "--prompt", "hi"]) == 2
    assert "not found" in capsys.readouterr().err


class ByteTokenizer:
    """Decodes token ids as UTF-8 bytes, so a multi-byte character can arrive split over two rounds."""

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(tokens).decode("utf-8", errors="replace")


def test_text_stream_holds_back_split_character():
    import io

    out = io.StringIO()
    stream = TextStream(ByteTokenizer(), out)
    encoded = list("né".encode())  # n, then é as two bytes
    stream.add(encoded[:2])
    assert out.getvalue() == "n"
    stream.add(encoded[2:])
    assert out.getvalue() == "né"
    stream.end()
    assert out.getvalue() == "né\n"


# ---------------------------------------------------------------------------------------------
# bpsim bench


@pytest.mark.slow
@pytest.mark.parametrize("predraft", ["auto", "off"])
def test_bench_end_to_end(use_real_pair, tmp_path, capsys, predraft):
    config = tmp_path / "predictor.json"
    write_exported(config, StaticPredictor("all", draft_len=3))
    out = tmp_path / "bench"

    assert cli.main(["bench", "--config", str(config), "--suite", "mt-bench", "--limit", "1", "--max-new-tokens", "8",
                     "--bootstrap", "20", "--warmup", "0", "--exhaustive", "0", "--predraft", predraft,
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "bench.json").read_text())
    kinds = [policy["kind"] for policy in report["policies"]]
    assert kinds == ["target", "plain", "pearl", "plus2-minus1", "branch", "exhaustive"]
    assert report["lossless"] == {"compared": 5, "differing": 0, "examples": []}
    for policy in report["policies"]:
        assert policy["requests"] == 1
        low, point, high = policy["tokens_per_s"][1], policy["tokens_per_s"][0], policy["tokens_per_s"][2]
        assert 0 < low <= point <= high
        assert math.isfinite(policy["simulation_error_percent"]), policy["name"]
    target = report["policies"][0]
    assert target["vs_target"] == [1.0, 1.0, 1.0]
    assert report["simulation"]["mode"] == "exact"
    assert report["simulation"]["oracle"]["tokens_per_s"]["value"] > 0
    assert report["thread_probe"]["sequential_ms"] > 0
    assert "oracle ceiling" in printed
    assert "branch:static" in printed
    assert "| `branch:static" in (out / "bench.md").read_text()

    branch = next(policy for policy in report["policies"] if policy["kind"] == "branch")
    replayed_as = report["simulation"]["predicted"][branch["name"]]["replayed_as"]
    assert replayed_as.startswith("sequential:") == (predraft == "off")
    branch_trace = read_trace(out / "traces" / trace_name(branch["name"]))
    predrafted = branch_trace.column("predraft_ms").null_count < branch_trace.num_rows
    assert predrafted == (predraft != "off")

    traces = sorted((out / "traces").glob("*.parquet"))
    assert len(traces) == 6
    for path in traces:
        table = read_trace(path)
        assert trace_metadata(table)["complete"] is True
        assert table.num_rows > 0


@pytest.mark.slow
def test_bench_interrupt_keeps_traces(use_real_pair, tmp_path, capsys, monkeypatch):
    config = tmp_path / "predictor.json"
    write_exported(config, StaticPredictor("all", draft_len=3))
    out = tmp_path / "bench"
    original = bpsim.branch.BranchPredictedDecoder.generate
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after target, plain, PEARL-style and +2/-1 on the first prompt
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(bpsim.branch.BranchPredictedDecoder, "generate", interrupted)
    assert cli.main(["bench", "--config", str(config), "--suite", "mt-bench", "--limit", "2", "--max-new-tokens", "4",
                     "--warmup", "0", "--no-probe", "--out", str(out)]) == 130
    error = capsys.readouterr().err
    assert f"the traces of the finished requests are in {out / 'traces'}" in error

    table = read_trace(out / "traces" / trace_name("target"))
    assert trace_metadata(table)["complete"] is False
    assert table.column("request_id").to_pylist()[0] == 0
    assert not (out / "bench.json").exists()


def summary(tokens, ms, hits=0, predrafts=0):
    return RequestSummary(tokens=tokens, rounds=1, mean_accepted=0.0, hits=hits, predrafts=predrafts, decode_ms=ms,
                          prefill_ms=0.0)


def test_summarise_pairs_ratios_by_prompt():
    policies = [BenchPolicy("target", "target", None), BenchPolicy("plain:draft_len=3", "plain", None, None, 3),
                BenchPolicy("branch:x", "branch", None)]
    speeds = {"target": 10.0, "plain:draft_len=3": 20.0, "branch:x": 30.0}
    runs = []
    for prompt, scale in enumerate([1.0, 3.0, 0.5]):  # prompts of different speed, equal ratios on each
        for name, speed in speeds.items():
            runs.append(Run(name, prompt, 0, (), summary(10, 1000.0 * 10 / (speed * scale), hits=prompt, predrafts=2)))
    results = summarise(runs, policies, 3, bootstrap=200, confidence=0.9)

    branch = results[2]
    assert branch["vs_target"] == pytest.approx([3.0, 3.0, 3.0])
    assert branch["vs_best_plain"] == pytest.approx([1.5, 1.5, 1.5])
    assert branch["tokens_per_s"][1] < branch["tokens_per_s"][0] < branch["tokens_per_s"][2]
    assert branch["hit_rate"] == pytest.approx(3 / 6)
    assert results[0]["vs_target"] == [1.0, 1.0, 1.0]


def test_lossless_check_finds_first_difference():
    runs = [Run("target", 0, 0, (1, 2, 3), summary(3, 1.0)), Run("plain", 0, 0, (1, 2, 3), summary(3, 1.0)),
            Run("branch", 0, 0, (1, 5, 3), summary(3, 1.0))]
    check = lossless_check(runs)
    assert check["compared"] == 2
    assert check["differing"] == 1
    assert check["examples"] == [{"policy": "branch", "prompt_index": 0, "repeat": 0, "first_difference": 1}]


def test_attach_predictions_error_percent():
    results = [{"name": "branch:x", "vs_target": [2.0, 1.8, 2.2]}, {"name": "plus2-minus1", "vs_target": [1.5, 1, 2]}]
    attach_predictions(results, {"predicted": {"branch:x": {"vs_target": {"value": 2.2}}}})
    assert results[0]["simulation_error_percent"] == pytest.approx(10.0)
    assert results[1]["simulation_error_percent"] is None


def test_rotated_starts_each_prompt_elsewhere():
    assert rotated([1, 2, 3], 0) == [1, 2, 3]
    assert rotated([1, 2, 3], 4) == [2, 3, 1]


def test_trace_names_are_plain():
    assert trace_name("exhaustive:width=all+exp-average:alpha=0.3,initial=1") == \
        "exhaustive_width_all_exp-average_alpha_0.3_initial_1.parquet"


def test_plain_draft_len_sources(tmp_path):
    class Args:
        plain_draft_len = None

    exported = write_exported(tmp_path / "a.json", StaticPredictor(), best_plain_draft_len=5)
    assert plain_draft_len_of(Args, exported)[0] == 5
    exported = write_exported(tmp_path / "b.json", StaticPredictor(), best_plain_draft_len=0)
    assert plain_draft_len_of(Args, exported)[0] == 4
    Args.plain_draft_len = 2
    assert plain_draft_len_of(Args, exported) == (2, "given")


def test_suite_skip_drops_first_prompts():
    from bpsim.prompts import PromptSuiteError, load_suite

    every = load_suite("mt-bench")
    later = load_suite("mt-bench", limit=3, skip=24)
    assert [p.prompt_id for p in later.prompts] == [p.prompt_id for p in every.prompts[24:27]]
    with pytest.raises(PromptSuiteError, match="leaves no prompt"):
        load_suite("mt-bench", skip=len(every.prompts))


def test_predictor_follows_predraft_override(tmp_path):
    from bpsim.commands.decode import load_predictor
    from bpsim.predictors.distribution import BinomialPredictor

    latency = LatencyModel(draft_ms_per_token=2.0, verify_base_ms=20.0)
    exported = write_exported(tmp_path / "predictor.json", BinomialPredictor(p=0.5, latency=latency))
    assert exported.predraft is True
    assert load_predictor(exported).predraft is True
    assert load_predictor(exported, False).predraft is False


def test_decode_rejects_backend_without_predraft(tmp_path, capsys):
    config = tmp_path / "predictor.json"
    write_exported(config, StaticPredictor("all", draft_len=3))
    assert cli.main(["decode", "--config", str(config), "--prompt", "hi", "--predraft", "off", "--width", "2"]) == 2
    assert "does not pre-draft" in capsys.readouterr().err


def test_bench_rejects_one_branch_exhaustive(tmp_path, capsys):
    config = tmp_path / "predictor.json"
    write_exported(config, StaticPredictor("all", draft_len=3))
    assert cli.main(["bench", "--config", str(config), "--suite", "mt-bench", "--exhaustive", "1"]) == 2
    assert "branch count >= 2" in capsys.readouterr().err
