import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bpsim.cli import main
from bpsim.latency import LatencyModel, LatencyModelError, fit_from_table
from bpsim.predictors.base import PredictorConfigError, RoundFeatures, predictor_from_config
from bpsim.predictors.distribution import BetaGeometricPredictor, CappedGeometricPredictor, EmpiricalPredictor
from bpsim.predictors.features import HazardGLMPredictor
from bpsim.predictors.history import (ExpAveragePredictor, LastValuePredictor, OneBitPredictor,
                                      PlusTwoMinusOnePredictor, SaturatingCounterPredictor, TwoLevelPredictor)
from bpsim.predictors.static import StaticPredictor
from bpsim.replay import Costs, replay, simulate, simulate_oracle
from bpsim.replay_data import (ReplayInputError, load_acceptance, realize, run_lengths, table_from_outcomes)
from bpsim.replay_steppers import build_stepper, first_draft_len
from bpsim.synthetic import synthetic_trace, write_synthetic

# A round of n drafts costs n ms of drafting and 10 + (n + 1) ms of verification.
SIMPLE = LatencyModel(draft_ms_per_token=1.0, verify_base_ms=10.0, verify_ms_per_token=1.0)


def random_table(requests=6, length=40, rate=0.75, second_rate=0.5, seed=0, latency=SIMPLE):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, size=requests)
    match = [rng.random(n) < rate for n in lengths]
    second = [rng.random(n) < second_rate for n in lengths]
    probs = [rng.random(n).astype(np.float32) for n in lengths]
    entropy = [(3 * rng.random(n)).astype(np.float32) for n in lengths]
    return table_from_outcomes(match, second, prompt_len=rng.integers(5, 30, size=requests), draft_max_prob=probs,
                               draft_entropy=entropy, latency=latency)


def history_predictors():
    return [
        LastValuePredictor(draft_len=3, max_draft_len=6),
        LastValuePredictor(draft_len=2, max_draft_len=5, length_rule="follow"),
        PlusTwoMinusOnePredictor(draft_len=3, max_draft_len=7),
        ExpAveragePredictor(alpha=0.5, initial=2.5, draft_len=4, length_rule="follow"),
        SaturatingCounterPredictor(bits=3, draft_len=4, length_rule="plus2-minus1"),
        TwoLevelPredictor(history=2, max_symbol=4, draft_len=4, table={"-1,-1": [0, 3, 1, 0, 0, 2]}),
        OneBitPredictor(high_draft_len=5, low_draft_len=1),
    ]


def test_run_lengths_count_consecutive_matches():
    match = torch.tensor([[True, True, False, True, True, True, False]])
    assert run_lengths(match).tolist() == [[2, 1, 0, 3, 2, 1, 0]]


def test_costs_mirror_latency_model():
    model = LatencyModel(draft_ms_per_token=1.5, verify_base_ms=9.0, draft_overhead_ms=0.7, verify_ms_per_token=0.4,
                         verify_ms_per_context=0.01, predraft_overlap=0.6, branch_batch_cost=0.3)
    costs = Costs(model)
    n = torch.tensor([0, 1, 3, 8])
    branches = torch.tensor([1, 2, 4, 9])
    window = torch.tensor([2.0, 5.0, 11.0, 3.0], dtype=torch.float64)
    context = torch.tensor([0, 10, 100, 1000])
    np.testing.assert_allclose(costs.draft_ms(n).numpy(), model.draft_ms(n.numpy()))
    np.testing.assert_allclose(costs.verify_ms(n + 1, context).numpy(), model.verify_ms(n.numpy() + 1, context.numpy()))
    np.testing.assert_allclose(costs.predraft_ms(n, branches).numpy(), model.predraft_ms(n.numpy(), branches.numpy()))
    np.testing.assert_allclose(costs.predraft_cost_ms(n, window, branches).numpy(),
                               model.predraft_cost_ms(n.numpy(), window.numpy(), branches.numpy()))


def test_plain_replay_hand_computed():
    # Request 0: draft_len 2 accepts 2 at s=0 (emits 3 tokens), then at s=3 again 2 of the
    # remaining 2 allowed: two rounds of 2 ms drafting + 13 ms verifying = 30 ms for 6 tokens.
    # Request 1 (4 tokens): s=0 accepts 0 (15 ms, 1 token); s=1 accepts 2 of 2 (15 ms, 3 tokens).
    table = table_from_outcomes([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1]], latency=SIMPLE)
    result = replay(table, draft_lens=[2], oracle=False, bootstrap=50, device="cpu")
    plain = result.policy("plain:draft_len=2")
    target = result.policy("target")
    assert plain.time_s == pytest.approx(0.060)
    assert plain.rounds == 4
    assert plain.tokens_per_s.value == pytest.approx(10 / 0.060)
    # Target-only: 10 tokens at 11 ms each.
    assert target.tokens_per_s.value == pytest.approx(10 / 0.110)
    assert plain.speedup_vs_target.value == pytest.approx(110 / 60)
    assert result.best_plain_draft_len == 2
    assert result.exact


def test_plain_replay_caps_drafts_at_request_end():
    table = table_from_outcomes([[1, 1, 1]], latency=SIMPLE)
    result = replay(table, draft_lens=[5], oracle=False, bootstrap=10, device="cpu")
    plain = result.policy("plain:draft_len=5")
    # One round of 2 drafts (3 tokens left): 2 ms + 13 ms.
    assert plain.time_s == pytest.approx(0.015)
    assert plain.approximate
    assert any("plain:draft_len=5" in warning for warning in result.warnings)


def test_losing_speculation_picks_target_only():
    slow_draft = LatencyModel(draft_ms_per_token=20.0, verify_base_ms=10.0, verify_ms_per_token=5.0)
    table = random_table(rate=0.6, latency=slow_draft)
    result = replay(table, [LastValuePredictor()], bootstrap=50, device="cpu")
    assert result.best_plain_draft_len == 0
    assert result.policy("target").speedup_vs_best_plain.value == pytest.approx(1.0)
    for policy in result.policies:
        if policy.kind == "plain":
            assert policy.speedup_vs_target.value < 1.0


@pytest.mark.parametrize("latency", [
    SIMPLE,
    LatencyModel(draft_ms_per_token=2.0, verify_base_ms=8.0, verify_ms_per_token=0.5, draft_overhead_ms=1.0,
                 verify_ms_per_context=0.01, predraft_overlap=0.5, predraft_overhead_ms=0.8, branch_batch_cost=0.4),
    LatencyModel(draft_ms_per_token=30.0, verify_base_ms=10.0, verify_ms_per_token=3.0, predraft_overlap=0.2),
])
def test_oracle_beats_every_policy(latency):
    table = random_table(requests=8, latency=latency, seed=3)
    predictors = [*history_predictors(), StaticPredictor("all", draft_len=4),
                  CappedGeometricPredictor(rate=0.75, latency=SIMPLE)]
    result = replay(table, predictors, exhaustive_widths=[0, 2], bootstrap=20, device="cpu")
    oracle = next(p for p in result.policies if p.kind == "oracle")
    if oracle.predrafts:
        assert oracle.hit_rate.value == pytest.approx(1.0)
    for policy in result.policies:
        if policy.kind != "oracle":
            assert oracle.tokens_per_s.value >= policy.tokens_per_s.value - 1e-9, policy.name


def test_oracle_matches_brute_force_on_tiny_request():
    # Every draft_len sequence over a 5-token request, sequential costs with a fully hidden
    # pre-draft: the oracle's time must equal the cheapest sequence.
    match = [1, 1, 0, 1, 0]
    table = table_from_outcomes([match], latency=SIMPLE)
    batch = realize(table)
    oracle = simulate_oracle(batch, SIMPLE, max_draft_len=3)

    def cheapest(s, previous):
        if s >= len(match):
            return 0.0
        best = float("inf")
        for n in range(4):
            n = min(n, len(match) - s - 1)
            run = 0
            while s + run < len(match) and match[s + run] and run < n:
                run += 1
            own = float(SIMPLE.draft_ms(n))
            if previous is not None and n > 0:
                window = float(SIMPLE.verify_ms(previous + 1))
                own = min(own, float(SIMPLE.predraft_cost_ms(n, window)))
            best = min(best, own + float(SIMPLE.verify_ms(n + 1)) + cheapest(s + run + 1, n))
        return best

    assert oracle.time_ms[0] == pytest.approx(cheapest(0, None))


@pytest.mark.parametrize("index", range(7))
def test_history_stepper_matches_scalar_path(index):
    predictor = history_predictors()[index]
    table = random_table(requests=5, seed=index)
    batch = realize(table)
    stepper = build_stepper([predictor], batch.rows, batch.match.device, max_draft_len=8, context_start=0,
                            context_stop=200)
    first = [first_draft_len(predictor, int(p)) for p in table.prompt_len]
    totals = simulate(batch, SIMPLE, 1, stepper=stepper, first_draft_lens=first, record=True)
    record = totals.record
    assert record["active"].any()
    for lane in range(batch.rows):
        scalar = type(predictor)(**predictor.params())
        scalar.reset()
        for step in np.flatnonzero(record["active"][:, lane].numpy()):
            n = int(record["draft_len"][step, lane])
            pos = int(record["position"][step, lane])
            features = RoundFeatures(n, tuple(table.draft_max_prob[lane, pos:pos + n].astype(float).tolist()),
                                     tuple(table.draft_entropy[lane, pos:pos + n].astype(float).tolist()), pos,
                                     int(table.prompt_len[lane]) + pos)
            expected = scalar.predict(features)
            assert int(record["predicted"][step, lane]) == expected.predicted, (lane, step)
            assert int(record["next_draft_len"][step, lane]) == expected.next_draft_len, (lane, step)
            scalar.update(int(record["accepted"][step, lane]), n)


def test_vectorised_replay_equals_scalar_replay():
    table = random_table(requests=4, length=30, seed=11)
    predictors = [*history_predictors(), StaticPredictor("fixed", k=1, draft_len=3),
                  BetaGeometricPredictor(alpha=3.0, beta=1.0, latency=SIMPLE),
                  EmpiricalPredictor(counts={"3": [5, 3, 2, 9]}, latency=SIMPLE),
                  HazardGLMPredictor(coefficients=[0.5, 2.0, -0.3, -0.1], mean_features=[0.5, 1.5], latency=SIMPLE)]
    fast = replay(table, predictors, exhaustive_widths=[2], oracle=False, bootstrap=10, device="cpu")
    slow = replay(table, predictors, exhaustive_widths=[2], oracle=False, bootstrap=10, device="cpu",
                  vectorised=False)
    for quick, reference in zip(fast.policies, slow.policies):
        assert quick.name == reference.name
        assert quick.time_s == pytest.approx(reference.time_s, rel=1e-12), quick.name
        assert quick.hits == reference.hits, quick.name
        assert quick.rounds == reference.rounds, quick.name


def test_branch_prediction_hit_needs_correction_token():
    # Every round rejects its first draft. A predictor that always guesses 0 is right about the
    # branch point, but only the second request's correction tokens match the draft's second-best.
    table = table_from_outcomes([[0] * 10, [0] * 10], [[0] * 10, [1] * 10], latency=SIMPLE)
    result = replay(table, [StaticPredictor("zero", draft_len=2)], oracle=False, bootstrap=10, device="cpu")
    policy = result.policy("static:choice=zero,draft_len=2")
    hits = policy.totals.hits
    assert hits[0] == 0
    assert hits[1] == policy.totals.predrafts[1] > 0


def test_predraft_cost_charged_on_hits_and_misses():
    # Every round rejects its first draft, and a static "zero" predictor pre-drafts 2 tokens each
    # round. Request 0 never guesses the correction, request 1 always does. A pre-draft of m
    # tokens costs m - 0.5 * min(m, verify) + 0.25 ms whether kept or not: 1.25 ms for 2 and
    # 0.75 ms for 1. A kept one spares the next round its drafting. Positions 0-7 draft 2, position 8
    # drafts 1, position 9 none. Positions 0-6 pre-draft 2 tokens, position 7 the 1 token that
    # position 8 can use, and position 8 none.
    latency = LatencyModel(draft_ms_per_token=1.0, verify_base_ms=10.0, verify_ms_per_token=1.0,
                           predraft_overlap=0.5, predraft_overhead_ms=0.25)
    table = table_from_outcomes([[0] * 10, [0] * 10], [[0] * 10, [1] * 10], latency=latency)
    result = replay(table, [StaticPredictor("zero", draft_len=2)], oracle=False, bootstrap=10, device="cpu")
    totals = result.policy("static:choice=zero,draft_len=2").totals
    verify = 8 * 13 + 12 + 11
    predrafts = 7 * 1.25 + 0.75
    assert totals.time_ms[0] == pytest.approx(17 + verify + predrafts)
    assert totals.time_ms[1] == pytest.approx(2 + verify + predrafts)


def test_negative_overlap_makes_predrafting_lose():
    # Where a pre-draft beside verification costs more than drafting afterwards, always
    # pre-drafting loses to plain decoding at the same draft_len even with every pre-draft kept.
    latency = LatencyModel(draft_ms_per_token=2.0, verify_base_ms=10.0, verify_ms_per_token=1.0,
                           predraft_overlap=-0.5)
    table = random_table(requests=4, rate=1.0, latency=latency, seed=2)
    result = replay(table, [StaticPredictor("all", draft_len=3)], draft_lens=[3], oracle=False, bootstrap=10,
                    device="cpu")
    predicted = result.policy("static:draft_len=3")
    assert predicted.hit_rate.value == pytest.approx(1.0)
    assert predicted.tokens_per_s.value < result.policy("plain:draft_len=3").tokens_per_s.value


def test_exhaustive_all_branches_raise_hit_rate():
    table = random_table(requests=4, second_rate=1.0, rate=0.9, seed=5)
    predictor = StaticPredictor("all", draft_len=3)
    result = replay(table, [predictor], exhaustive_widths=[0], oracle=False, bootstrap=10, device="cpu")
    exhaustive = next(p for p in result.policies if p.kind == "exhaustive")
    single = result.policy("static:draft_len=3")
    # With every correction guess right only the all-accepted branch can still miss.
    assert exhaustive.hit_rate.value > single.hit_rate.value
    assert exhaustive.hit_rate.value > 0.85


def test_sampling_profile_is_labelled_approximate(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"request_id": i, "prompt_id": f"p{i}", "tokens": rng.integers(0, 100, 12).tolist(),
             "match": (rng.random(12) < 0.7).tolist(), "second_match": (rng.random(12) < 0.3).tolist(),
             "accept_prob": rng.random(12).tolist(), "draft_max_prob": rng.random(12).tolist(),
             "draft_entropy": rng.random(12).tolist()} for i in range(5)]
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {b"bpsim": json.dumps({"sampling": {"mode": "sample", "temperature": 1.0}}).encode()})
    path = tmp_path / "run.profile.parquet"
    pq.write_table(table, path)
    acceptance = load_acceptance([path], latency=SIMPLE)
    assert not acceptance.exact
    result = replay(acceptance, [LastValuePredictor()], bootstrap=10, device="cpu")
    assert result.samples > 1
    assert "APPROXIMATE" in result.format_table()
    assert "APPROXIMATE" in result.to_markdown()
    assert result.to_dict()["mode"] == "approximate"


def test_greedy_profile_replays_exactly(tmp_path):
    trace = tmp_path / "run.parquet"
    write_synthetic(trace, requests=3, rounds_per_request=4, draft_len=2)
    recorded = pq.read_table(trace)
    rows = []
    for request in range(3):
        emitted = int(np.sum(np.asarray(recorded.column("emitted"))[np.asarray(recorded.column("request_id")) == request]))
        rows.append({"request_id": request, "tokens": list(range(emitted)), "match": [True, False] * (emitted // 2)
                     + [True] * (emitted % 2), "second_match": [False] * emitted})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "run.profile.parquet")
    acceptance = load_acceptance([tmp_path / "run.profile.parquet"])
    assert acceptance.exact
    assert acceptance.latency is not None
    assert (acceptance.prompt_len == 32).all()


def test_trace_replay_is_approximate(tmp_path):
    path = write_synthetic(tmp_path / "t.parquet", requests=4, rounds_per_request=20, draft_len=(2, 4))
    acceptance = load_acceptance([path])
    assert not acceptance.exact
    assert "never judged" in acceptance.approximation
    assert acceptance.requests == 4
    recorded = pq.read_table(path)
    assert acceptance.tokens == int(np.sum(recorded.column("emitted").to_numpy()))


def test_empty_trace_rejected(tmp_path):
    empty = synthetic_trace(requests=1, rounds_per_request=1).slice(0, 0)
    path = tmp_path / "empty.parquet"
    pq.write_table(empty, path)
    with pytest.raises(ReplayInputError, match="contains no rounds"):
        load_acceptance([path])


def test_empty_profile_rejected(tmp_path):
    schema = pa.schema([("request_id", pa.int32()), ("tokens", pa.list_(pa.int32())),
                        ("match", pa.list_(pa.bool_())), ("second_match", pa.list_(pa.bool_()))])
    path = tmp_path / "empty.profile.parquet"
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(ReplayInputError, match="contains no requests"):
        load_acceptance([path], latency=SIMPLE)


def test_no_inputs_rejected():
    with pytest.raises(ReplayInputError, match="no traces or profiles"):
        load_acceptance([])
    with pytest.raises(ReplayInputError, match="no requests"):
        table_from_outcomes([])


def test_draft_len_beyond_depth_warns(caplog):
    # Requests of 5 tokens cannot judge 8 drafts in one round: the replay still returns results, capped
    # at the request's end, and says the policy's figures are approximate.
    table = table_from_outcomes([[1, 1, 0, 1, 1]] * 3, latency=SIMPLE)
    config = StaticPredictor("all", draft_len=8).to_config()
    with caplog.at_level("WARNING"):
        result = replay(table, [predictor_from_config(config)], draft_lens=[2], bootstrap=10, device="cpu")
    policy = result.policy("static:draft_len=8")
    assert policy.approximate
    assert not result.policy("plain:draft_len=2").approximate
    assert any("static:draft_len=8" in warning and "approximate" in warning for warning in result.warnings)
    assert "approximate" in caplog.text


def test_newer_config_version_rejected(tmp_path):
    config = {**LastValuePredictor().to_config(), "version": 99}
    with pytest.raises(PredictorConfigError, match="version 99"):
        predictor_from_config(config)
    trace = write_synthetic(tmp_path / "t.parquet", requests=2, rounds_per_request=5)
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(config))
    assert main(["replay", str(trace), "--config", str(path), "--bootstrap", "10"]) == 2


@pytest.mark.parametrize("overlap, overhead", [(0.6, 0.3), (-0.4, 0.0)])
def test_latency_fit_recovers_predraft_overlap(overlap, overhead):
    rng = np.random.default_rng(0)
    rounds = 400
    draft_len = rng.integers(1, 6, rounds)
    draft_ms = 2.0 * draft_len
    verify_ms = 10.0 + 0.5 * (draft_len + 1)
    predraft_len = rng.integers(1, 6, rounds)
    launched = rng.random(rounds) < 0.7
    # The recorded pre-draft compute ran on fewer threads; the fit charges the model's draft_ms.
    predraft_ms = np.where(launched, 3.1 * predraft_len, np.nan)
    compute = 2.0 * predraft_len
    round_ms = draft_ms + verify_ms + np.where(launched, compute - overlap * np.minimum(compute, verify_ms) + overhead,
                                               0.0)
    model = LatencyModel.fit(draft_len, draft_ms, verify_ms, predraft_ms=predraft_ms, round_ms=round_ms,
                             predraft_len=np.where(launched, predraft_len, 0))
    assert model.predraft_overlap == pytest.approx(overlap)
    assert model.predraft_overhead_ms == pytest.approx(overhead, abs=1e-9)
    assert "predraft_overlap" not in model.assumed
    assert "branch_batch_cost" in model.assumed
    plain = fit_from_table(synthetic_trace(requests=3, draft_len=(2, 4)))
    assert {"predraft_overlap", "predraft_overhead_ms", "branch_batch_cost"} <= set(plain.assumed)


def test_replay_cli_writes_json_and_markdown(tmp_path, capsys):
    trace = write_synthetic(tmp_path / "t.parquet", requests=4, rounds_per_request=10, draft_len=(2, 4))
    out = tmp_path / "out"
    code = main(["replay", str(trace), "--predictor", "last-value:draft_len=3", "--predictor", "one-bit",
                 "--draft-lens", "1,2,3", "--exhaustive", "2", "--bootstrap", "20", "--device", "cpu",
                 "--assume", "branch_batch_cost=0.25", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "latency model" in printed
    assert "(assumed)" in printed
    assert "APPROXIMATE" in printed
    data = json.loads((out / "replay.json").read_text())
    assert data["mode"] == "approximate"
    assert data["latency"]["branch_batch_cost"] == 0.25
    names = [policy["name"] for policy in data["policies"]]
    assert "last-value:draft_len=3" in names
    assert "exhaustive:width=2+one-bit" in names
    assert "| policy |" in (out / "replay.md").read_text()


def test_replay_cli_rejects_unknown_family(tmp_path, capsys):
    trace = write_synthetic(tmp_path / "t.parquet", requests=2, rounds_per_request=5)
    assert main(["replay", str(trace), "--predictor", "no-such-family"]) == 2
    assert "no-such-family" in capsys.readouterr().err


def test_trace_with_its_profile_counted_once(tmp_path):
    trace = write_synthetic(tmp_path / "run.parquet", requests=3, rounds_per_request=4, draft_len=2)
    recorded = pq.read_table(trace)
    rows = []
    for request in range(3):
        mask = np.asarray(recorded.column("request_id")) == request
        emitted = int(np.sum(np.asarray(recorded.column("emitted"))[mask]))
        rows.append({"request_id": request, "tokens": [0] * emitted, "match": [True] * emitted,
                     "second_match": [False] * emitted})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "run.profile.parquet")
    acceptance = load_acceptance([trace, tmp_path / "run.profile.parquet"])
    assert acceptance.requests == 3
    assert acceptance.exact


def test_newer_profile_version_rejected(tmp_path):
    rows = [{"request_id": 0, "tokens": [1, 2], "match": [True, False], "second_match": [False, True]}]
    table = pa.Table.from_pylist(rows).replace_schema_metadata({b"bpsim": json.dumps({"profile_version": 5}).encode()})
    path = tmp_path / "new.profile.parquet"
    pq.write_table(table, path)
    with pytest.raises(ReplayInputError, match="profile_version 5"):
        load_acceptance([path], latency=SIMPLE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_replay_matches_cpu():
    table = random_table(requests=6, seed=4)
    predictors = [*history_predictors(), CappedGeometricPredictor(rate=0.75, latency=SIMPLE),
                  HazardGLMPredictor(coefficients=[0.5, 2.0, -0.3, -0.1], mean_features=[0.5, 1.5], latency=SIMPLE)]
    on_cpu = replay(table, predictors, exhaustive_widths=[2], bootstrap=10, device="cpu")
    on_cuda = replay(table, predictors, exhaustive_widths=[2], bootstrap=10, device="cuda")
    assert on_cuda.device.startswith("cuda")
    for cpu_policy, cuda_policy in zip(on_cpu.policies, on_cuda.policies):
        assert cuda_policy.name == cpu_policy.name
        assert cuda_policy.time_s == pytest.approx(cpu_policy.time_s, rel=1e-9), cpu_policy.name
        assert cuda_policy.hits == cpu_policy.hits, cpu_policy.name


def test_target_only_trace_joins_latency_fit():
    from pathlib import Path

    from bpsim.replay_data import load_acceptance

    shipped = Path(__file__).resolve().parent.parent / "traces"
    table = load_acceptance([shipped / "mt-bench-greedy-k4.profile.parquet", shipped / "mt-bench-greedy-target.parquet"])
    assert len(table.request_labels) == 6
    assert "verify_ms_per_token" not in table.latency.assumed
    assert table.latency.verify_ms(5) > table.latency.verify_ms(1)


def test_huge_pattern_table_uses_scalar_path(caplog):
    # history 8 over 11 symbols is 11^8 patterns per lane, too many for a dense table.
    table = random_table(requests=2, length=12, seed=6)
    predictor = TwoLevelPredictor(history=8, max_symbol=8, draft_len=3)
    with caplog.at_level("WARNING"):
        result = replay(table, [predictor], oracle=False, bootstrap=10, device="cpu")
    assert "one lane at a time" in caplog.text
    assert result.policy("two-level:history=8,draft_len=3").rounds > 0


def test_sequential_predictor_pays_no_predraft():
    # Without pre-drafting, a predictor that always requests 2 drafts decodes exactly as plain
    # speculative decoding at draft_len 2, however costly a pre-draft would be.
    latency = LatencyModel(draft_ms_per_token=2.0, verify_base_ms=10.0, verify_ms_per_token=1.0,
                           predraft_overlap=-1.0, predraft_overhead_ms=5.0)
    table = random_table(requests=5, latency=latency, seed=4)
    result = replay(table, [StaticPredictor("zero", draft_len=2)], draft_lens=[2], sequential=True, oracle=False,
                    bootstrap=10, device="cpu")
    sequential = result.policy("sequential:static:choice=zero,draft_len=2")
    plain = result.policy("plain:draft_len=2")
    assert sequential.kind == "sequential"
    assert sequential.predrafts == 0
    assert sequential.hits == 0
    assert sequential.time_s == pytest.approx(plain.time_s, rel=1e-12)
    assert result.policy("static:choice=zero,draft_len=2").time_s > sequential.time_s


def test_latency_traces_join_fit_not_replay(tmp_path):
    from test_fit_command import predrafting_trace

    trace = write_synthetic(tmp_path / "t.parquet", requests=4, rounds_per_request=12, draft_len=(2, 4),
                            latency_noise=0.0)
    timing = predrafting_trace(tmp_path / "predraft.parquet", -0.25)
    alone = load_acceptance([trace])
    both = load_acceptance([trace], latency_paths=[timing])
    assert both.requests == alone.requests
    assert both.latency.predraft_overlap == pytest.approx(-0.25)
    assert "predraft_overlap" in alone.latency.assumed
    other = predrafting_trace(tmp_path / "other.parquet", 0.5, draft="other-draft")
    with pytest.raises(ReplayInputError, match="other-draft"):
        load_acceptance([trace], latency_paths=[other])


def test_sequential_distribution_predictor_drafts_when_plain_pays():
    # A pre-draft here costs more than it saves, so a distribution predictor scored for
    # pre-drafting never drafts. Rebuilt for the sequential mode, it drafts and beats the target.
    latency = LatencyModel(draft_ms_per_token=3.0, verify_base_ms=10.0, verify_ms_per_token=1.0, predraft_overlap=-1.0)
    rng = np.random.default_rng(0)
    table = table_from_outcomes([rng.random(120) < 0.8 for _ in range(8)], [rng.random(120) < 0.15 for _ in range(8)],
                                latency=latency)
    predictor = CappedGeometricPredictor(rate=0.8, latency=latency, bonus_guess_rate=0.3, correction_guess_rate=0.15)
    result = replay(table, [predictor], draft_lens=[2], sequential=True, oracle=False, bootstrap=10, device="cpu")
    sequential = next(p for p in result.policies if p.kind == "sequential")
    assert sequential.config["params"]["predraft"] is False
    assert sequential.totals.drafted.sum() > 0
    assert sequential.tokens_per_s.value > result.policy("target").tokens_per_s.value


def test_overlap_fit_one_predraft_length():
    # The pre-draft (36 ms) outlasts verification, so the overlappable time barely varies: only
    # the overlap can be fitted, and the fixed overhead is labelled as assumed.
    rng = np.random.default_rng(1)
    rounds = 400
    context = rng.integers(100, 260, rounds).astype(float)
    quiet = np.arange(rounds) < 200
    draft_len = np.where(quiet, rng.integers(1, 5, rounds), 4).astype(float)
    draft_ms = 9.0 * draft_len
    verify_ms = 25 + 1.6 * (draft_len + 1) + 0.005 * context + rng.normal(0, 0.5, rounds)
    compute = 36.0
    hidden = -0.4 * np.minimum(compute, 25 + 1.6 * 5 + 0.005 * context)
    round_ms = draft_ms + verify_ms + np.where(quiet, 0.0, compute - hidden)
    model = LatencyModel.fit(draft_len, draft_ms, verify_ms, context, predraft_ms=np.where(quiet, np.nan, 80.0),
                             round_ms=round_ms, predraft_len=np.where(quiet, 0, 4))
    assert model.predraft_overlap == pytest.approx(-0.4, abs=0.03)
    assert model.predraft_overhead_ms == 0.0
    assert "predraft_overhead_ms" in model.assumed
    assert "predraft_overlap" not in model.assumed


def test_overlap_not_fitted_without_verify_slope(caplog):
    rounds = 40
    draft_len = np.full(rounds, 4.0)
    predrafted = np.arange(rounds) >= 20
    with caplog.at_level("WARNING"):
        model = LatencyModel.fit(draft_len, 9.0 * draft_len, np.full(rounds, 40.0),
                                 predraft_ms=np.where(predrafted, 36.0, np.nan), round_ms=np.full(rounds, 120.0),
                                 predraft_len=np.where(predrafted, 4, 0))
    assert "predraft_overlap" in model.assumed
    assert any("overlap not fitted" in record.message for record in caplog.records)


def test_latency_traces_reject_profiles_and_repeats(tmp_path):
    trace = write_synthetic(tmp_path / "t.parquet", requests=3, rounds_per_request=8)
    with pytest.raises(ReplayInputError, match="count twice"):
        load_acceptance([trace], latency_paths=[trace])
    with pytest.raises(ReplayInputError, match="is a profile"):
        load_acceptance([trace], latency_paths=[tmp_path / "t.profile.parquet"])


def test_predraft_only_timings_rejected():
    rounds = 30
    draft_len = np.full(rounds, 4.0)
    with pytest.raises(LatencyModelError, match="without a pre-draft"):
        LatencyModel.fit(draft_len, 9.0 * draft_len, np.full(rounds, 40.0), predraft_ms=np.full(rounds, 36.0),
                         round_ms=np.full(rounds, 90.0), predraft_len=np.full(rounds, 4))


def test_plus2_minus1_rule_hand_computed():
    # Runs of matches: 3 from position 0, 6 from position 4. The schedule starts at 2, grows by 2
    # after an all-accepted round and shrinks by 1 otherwise, within 1..5. The rounds at positions
    # 0, 3, 4, 8, 11 and 12 draft 2, 4, 3, 4 (capped by the request), 1 and 0, and cost 94 ms.
    table = table_from_outcomes([[1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1]], latency=SIMPLE)
    result = replay(table, draft_lens=[2], heuristic=(2, 5), oracle=False, bootstrap=5, device="cpu")
    rule = result.policy("plus2-minus1-rule:first=2,max=5")
    assert rule.kind == "heuristic"
    assert rule.rounds == 6
    assert rule.time_s * 1000 == pytest.approx(15 + 19 + 17 + 19 + 13 + 11)
    assert rule.predrafts == 0
