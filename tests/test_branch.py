"""Branch-predicted decoding: lossless greedy and sampled output, reuse of kept pre-drafts, cache handling, traces."""

import numpy as np
import pytest
import scipy.stats
import torch

import bpsim.branch
from bpsim.acceptance import logits_to_probs
from bpsim.branch import BranchConfig, BranchPredictedDecoder, PlusTwoMinusOne
from bpsim.decoding import DecodeConfig, DecodingError, eos_token_ids
from bpsim.predictors.base import Prediction, RoundFeatures
from bpsim.predictors.history import LastValuePredictor, OneBitPredictor
from bpsim.predictors.static import StaticPredictor
from bpsim.predraft import branch_points, common_prefix
from bpsim.sampling import SamplingConfig
from bpsim.traces import TraceWriter, read_trace, validate_trace
from decoding_helpers import (SIGNIFICANCE, CountingModel, ForcedToken, NoisyLogits, check_greedy_match,
                              greedy_references_for, perturbed, reference_greedy, rounds_table, toy_llama)

NEW_TOKENS = 24


# ---------------------------------------------------------------------------------------------
# Greedy decoding with the real target


@pytest.fixture(scope="module")
def greedy_references(real_pair, mt_bench_prompts):
    return greedy_references_for(real_pair, mt_bench_prompts, NEW_TOKENS)


def greedy_runs(real_pair, prompts, draft, predictor, width=1, backend="thread"):
    eos = eos_token_ids(real_pair.tokenizer, real_pair.target.model)
    config = DecodeConfig(draft_len=3, max_new_tokens=NEW_TOKENS)
    with BranchPredictedDecoder(real_pair.target.model, draft, config, predictor=predictor,
                                branch=BranchConfig(width=width, backend=backend), eos_token_ids=eos,
                                vocab_size=real_pair.vocab_size) as decoder:
        return [decoder.generate(ids) for ids in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hits-often", "always-misses", "exhaustive"])
def test_greedy_matches_target_only(real_pair, mt_bench_prompts, greedy_references, case):
    """Branch-predicted greedy output equals the target's greedy output token for token.

    "hits-often" drafts with the target plus a little noise and predicts every draft accepted.
    "always-misses" drafts a token the target never takes, but still predicts every draft
    accepted. "exhaustive" pre-drafts every branch point of the noisy draft at once.
    """
    target = real_pair.target.model
    if case == "always-misses":
        draft, predictor, width = ForcedToken(target, real_pair.vocab_size - 1), StaticPredictor("all", draft_len=3), 1
    else:
        draft, predictor = NoisyLogits(target, 1.0), StaticPredictor("all", draft_len=3)
        width = 0 if case == "exhaustive" else 1
    generations = greedy_runs(real_pair, mt_bench_prompts, draft, predictor, width)

    rounds = []
    for index, (generation, (reference, gaps)) in enumerate(zip(generations, greedy_references)):
        check_greedy_match(list(generation.tokens), reference, gaps, f"{case}, prompt {index}")
        validate_trace(rounds_table(generation.rounds), f"rounds of prompt {index}")
        rounds.extend(generation.rounds[:-1])  # the last round's pre-draft is never checked
    hits = [record.predraft_hit for record in rounds]
    assert None not in hits, "a round that did not end its request has no pre-draft verdict"
    if case == "always-misses":
        assert not any(hits), "a pre-draft was kept although the target accepted none of the forced drafts"
    else:
        assert sum(hits) >= 2, f"only {sum(hits)} of {len(hits)} pre-drafts were kept"
        assert not all(hits), "every pre-draft was kept, so the miss path was not exercised"


@pytest.mark.slow
def test_real_draft_matches_target_only(real_pair, mt_bench_prompts, greedy_references):
    """The loaded draft with a history predictor, on the thread backend."""
    generations = greedy_runs(real_pair, mt_bench_prompts[:1], real_pair.draft.model, LastValuePredictor(draft_len=3))
    reference, gaps = greedy_references[0]
    check_greedy_match(list(generations[0].tokens), reference, gaps, "loaded draft")


# ---------------------------------------------------------------------------------------------
# Kept pre-drafts are reused, and the draft's cache always matches fresh drafting


def test_kept_predraft_saves_draft_passes():
    """Count the draft's forward passes: a kept pre-draft's drafts are not drafted again.

    With the inline backend every pre-draft runs to its end: m + 1 passes from branch point n
    (one finds the guessed continuation). Rounds after a kept pre-draft draft nothing.
    """
    target = toy_llama(2, vocab=64, logit_scale=2.0)
    draft = CountingModel(perturbed(target, 0.3, 5))
    prompt = [1, 2, 3, 4, 5]
    decoder = BranchPredictedDecoder(target, draft, DecodeConfig(draft_len=3, max_new_tokens=60),
                                     predictor=StaticPredictor("all", draft_len=3), branch=BranchConfig(backend="inline"))
    generation = decoder.generate(prompt)
    rounds = generation.rounds

    kept = [False] + [bool(record.predraft_hit) for record in rounds[:-1]]  # drafts of round i came from round i - 1
    assert any(kept), "no pre-draft was kept; the test needs hits"
    assert not all(kept[1:]), "every pre-draft was kept; the test needs misses too"
    drafting = sum(record.draft_len for record, from_predraft in zip(rounds, kept) if not from_predraft)
    predrafting = sum(3 + 1 for record in rounds if record.predraft_ms is not None)
    assert draft.calls == 1 + drafting + predrafting  # 1: the prompt pass
    for record, from_predraft in zip(rounds, kept):
        if from_predraft:
            assert record.draft_ms == 0.0


def test_hit_means_branch_and_guess_matched():
    target = toy_llama(2, vocab=64, logit_scale=2.0)
    draft = perturbed(target, 1.0, 5)
    decoder = BranchPredictedDecoder(target, draft, DecodeConfig(draft_len=3, max_new_tokens=60),
                                     predictor=LastValuePredictor(draft_len=3))
    with decoder:
        rounds = decoder.generate([1, 2, 3, 4, 5]).rounds
    assert any(record.predraft_hit for record in rounds)
    for record in rounds:
        if record.predraft_hit:
            assert record.accepted == record.predicted
            if record.predicted < record.draft_len:
                # The guess at a rejection is the draft's best token other than the rejected draft.
                assert record.tokens[record.predicted] == record.draft_second_tokens[record.predicted]
        elif record.predraft_hit is False and record.predicted == record.accepted < record.draft_len:
            assert record.tokens[record.accepted] != record.draft_second_tokens[record.accepted]


def fresh_drafts(draft, context, draft_len):
    tokens, gaps = reference_greedy(draft, context, draft_len)
    return tokens, min(gaps)


@pytest.mark.parametrize("predictor,width", [
    (StaticPredictor("all", draft_len=3), 1),
    (StaticPredictor("fixed", k=1, draft_len=4), 1),
    (LastValuePredictor(draft_len=3), 1),
    (LastValuePredictor(draft_len=3), 2),
    (LastValuePredictor(draft_len=3), 0),
    (OneBitPredictor(high_draft_len=4, low_draft_len=0), 0),
], ids=["all", "fixed-1", "last-value", "last-value-width-2", "last-value-exhaustive", "one-bit-exhaustive"])
def test_drafts_equal_fresh_drafting(predictor, width):
    """Every round's drafts equal greedy drafting from scratch on the round's context.

    This holds only if the draft's cache is right after every hit (in place or cut out of a
    batch) and every miss (rolled back, accepted drafts fed again). Float64 models keep the
    comparison clear of near-ties.
    """
    target = toy_llama(2, vocab=64, logit_scale=2.0).double()
    draft = perturbed(target, 0.3, 5)
    prompt = [1, 2, 3, 4, 5]
    with BranchPredictedDecoder(target, draft, DecodeConfig(draft_len=3, max_new_tokens=50), predictor=predictor,
                                branch=BranchConfig(width=width, backend="thread")) as decoder:
        generation = decoder.generate(prompt)
    reference, _ = reference_greedy(target, prompt, 50)
    assert list(generation.tokens) == reference

    context = list(prompt)
    for record in generation.rounds:
        if record.draft_len:
            expected, gap = fresh_drafts(draft, context, record.draft_len)
            assert list(record.draft_tokens) == expected, (
                f"round {record.round}: drafts {record.draft_tokens}, fresh drafting gives {expected} (gap {gap:.1e})")
        context += list(record.tokens)
    verdicts = [record.predraft_hit for record in generation.rounds if record.predraft_hit is not None]
    assert any(verdicts), "no pre-draft was kept, so the cache after a hit was not checked"
    assert not all(verdicts), "no pre-draft was missed, so the cache after a miss was not checked"


@pytest.mark.parametrize("predicted,draft_len,width,expected", [
    (2, 4, 1, [2]), (4, 4, 1, [4]), (0, 4, 3, [0, 1, 2]), (2, 4, 3, [1, 2, 3]), (4, 4, 3, [2, 3, 4]),
    (1, 4, 0, [0, 1, 2, 3, 4]), (0, 0, 3, [0]), (3, 4, 2, [3, 4]),
])
def test_branch_points(predicted, draft_len, width, expected):
    assert list(branch_points(predicted, draft_len, width)) == expected


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


# ---------------------------------------------------------------------------------------------
# Sampling: output follows the target's distribution, also through kept pre-drafts


def conditional_pit(target, draft, prompt, sequences, sampling, seed=0):
    """Return the randomised probability integral transform of every sampled token, (samples, tokens).

    Under the target's conditional distribution p at each position, with tokens ordered by the
    draft's probability, u = P(earlier tokens) + V * p(token) for V uniform. If the tokens follow
    the target, every u is uniform on [0, 1] and independent of the earlier ones (by the chain
    rule), so binned u values are a multinomial with equal cells. A pre-draft that favours the
    draft's likely tokens pushes u towards 0.
    """
    batch = torch.tensor([prompt + list(sequence) for sequence in sequences])  # (samples, prompt + tokens)
    with torch.inference_mode():
        target_probs = logits_to_probs(target(input_ids=batch).logits[:, len(prompt) - 1:-1], sampling.temperature,
                                       sampling.top_k, sampling.top_p).double()  # (samples, tokens, vocab)
        draft_probs = torch.softmax(draft(input_ids=batch).logits[:, len(prompt) - 1:-1].double(), dim=-1)
    order = draft_probs.argsort(dim=-1, descending=True, stable=True)  # (samples, tokens, vocab)
    ordered = target_probs.gather(-1, order)
    before = ordered.cumsum(dim=-1) - ordered
    rank = (order == torch.tensor(sequences)[..., None]).long().argmax(dim=-1, keepdim=True)  # (samples, tokens, 1)
    mass = ordered.gather(-1, rank)[..., 0]
    assert (mass > 0).all(), "a sampled token has probability 0 under the filtered target"
    uniform = torch.rand(mass.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (before.gather(-1, rank)[..., 0] + uniform * mass).numpy()


def uniformity_p_value(values: np.ndarray, bins: int = 10) -> float:
    counts = np.histogram(values, bins=bins, range=(0.0, 1.0))[0]
    return float(scipy.stats.chisquare(counts).pvalue)


SAMPLED_TOKENS = 8


def sample_sequences(target, draft, sampling, draft_len, width, samples, backend="inline", predictor=None):
    """Decode ``samples`` requests; return the sequences and the (request, position) of each round's first token
    whose drafts came from a kept pre-draft."""
    predictor = predictor or StaticPredictor("all", draft_len=draft_len)
    config = DecodeConfig(draft_len=draft_len, max_new_tokens=SAMPLED_TOKENS, sampling=sampling)
    generator = torch.Generator().manual_seed(11)
    sequences, predrafted = [], []
    with BranchPredictedDecoder(target, draft, config, predictor=predictor,
                                branch=BranchConfig(width=width, backend=backend)) as decoder:
        for request in range(samples):
            rounds = decoder.generate([1, 3, 2], generator).rounds
            sequences.append([token for record in rounds for token in record.tokens])
            predrafted += [(request, record.position) for previous, record in zip(rounds, rounds[1:])
                           if previous.predraft_hit]
    return sequences, predrafted


@pytest.fixture(scope="module")
def sampling_models():
    target = toy_llama(1, vocab=4, logit_scale=0.3)
    return {"target": target, "close": perturbed(target, 0.2, 3), "other": toy_llama(2, vocab=4, logit_scale=0.3)}


@pytest.mark.parametrize("draft_kind,draft_len,width,sampling", [
    ("close", 1, 1, SamplingConfig(temperature=1.0)),
    ("other", 2, 0, SamplingConfig(temperature=1.0)),
    ("close", 2, 2, SamplingConfig(temperature=0.8, top_k=3, top_p=0.9)),
])
def test_sampled_tokens_follow_target(sampling_models, draft_kind, draft_len, width, sampling):
    """Sampled tokens follow the target's conditional distribution, overall and where drafts came from a pre-draft.

    Chi-square of the binned integral transform against uniform (see ``conditional_pit``); the
    biased variant below shows that 200 requests are enough to reject a biased pre-draft.
    """
    target, draft = sampling_models["target"], sampling_models[draft_kind]
    sequences, predrafted = sample_sequences(target, draft, sampling, draft_len, width, samples=200)
    pit = conditional_pit(target, draft, [1, 3, 2], sequences, sampling)
    assert len(predrafted) >= 50, f"only {len(predrafted)} rounds took their drafts from a pre-draft"
    overall = uniformity_p_value(pit.ravel())
    kept = uniformity_p_value(pit[tuple(np.array(predrafted).T)])
    assert overall > SIGNIFICANCE, f"all tokens: chi-square p-value {overall:.2e}"
    assert kept > SIGNIFICANCE, f"tokens after a kept pre-draft: chi-square p-value {kept:.2e}"


def test_biased_predraft_detected(sampling_models, monkeypatch):
    """A pre-draft that takes the draft's argmax but reports the sampling distribution is rejected."""
    original = bpsim.branch.run_predraft

    def argmax_predraft(draft_model, plan, sampling, generator, cancel=None):
        # Greedy pre-drafting: at temperature 1 without filters its probs are the sampling ones.
        return original(draft_model, plan, SamplingConfig(), generator, cancel)

    monkeypatch.setattr(bpsim.branch, "run_predraft", argmax_predraft)
    target, draft = sampling_models["target"], sampling_models["close"]
    sampling = SamplingConfig(temperature=1.0)
    sequences, predrafted = sample_sequences(target, draft, sampling, 1, 1, samples=200)
    pit = conditional_pit(target, draft, [1, 3, 2], sequences, sampling)
    kept = uniformity_p_value(pit[tuple(np.array(predrafted).T)])
    assert kept < SIGNIFICANCE, f"the biased pre-draft passed with p-value {kept:.2e}"


def test_thread_backend_reproduces_inline(sampling_models):
    """Seeded sampling gives the same tokens whether pre-drafts run on a thread (and stop early) or inline."""
    target, draft = sampling_models["target"], sampling_models["other"]
    sampling = SamplingConfig(temperature=1.0)
    inline, _ = sample_sequences(target, draft, sampling, 2, 1, samples=20, predictor=LastValuePredictor(draft_len=2))
    threaded, _ = sample_sequences(target, draft, sampling, 2, 1, samples=20, backend="thread",
                                   predictor=LastValuePredictor(draft_len=2))
    assert threaded == inline


# ---------------------------------------------------------------------------------------------
# Policies, records and traces


def test_plus2_minus1_draft_lengths():
    target = toy_llama(2, vocab=64, logit_scale=2.0)
    decoder = BranchPredictedDecoder(target, perturbed(target, 1.0, 5), DecodeConfig(max_new_tokens=40),
                                     branch=BranchConfig(predraft=False), draft_len_rule=PlusTwoMinusOne(2, 5))
    rounds = decoder.generate([1, 2, 3, 4, 5]).rounds
    assert rounds[0].draft_len == 2
    for previous, record in zip(rounds, rounds[1:]):
        expected = previous.draft_len + 2 if previous.accepted == previous.draft_len else previous.draft_len - 1
        assert record.draft_len == min(max(expected, 1), 5)
    assert all(record.predraft_hit is None and record.predraft_ms is None for record in rounds)
    reference, _ = reference_greedy(target, [1, 2, 3, 4, 5], 40)
    assert [token for record in rounds for token in record.tokens] == reference


def test_trace_round_trip(tmp_path):
    target = toy_llama(2, vocab=64, logit_scale=2.0)
    with BranchPredictedDecoder(target, perturbed(target, 1.0, 5), DecodeConfig(draft_len=3, max_new_tokens=30),
                                predictor=LastValuePredictor(draft_len=3)) as decoder:
        generations = [decoder.generate([1, 2, 3, 4, 5]), decoder.generate([7, 8, 9])]
    writer = TraceWriter(tmp_path / "branch.parquet", {"sampling": {"mode": "greedy"}})
    for request, generation in enumerate(generations):
        writer.add_request(request, f"p{request}", list(generation.rounds))
    table = read_trace(writer.close())

    last = np.asarray(table.column("finished").to_pylist())
    predicted = table.column("predicted").to_pylist()
    hits = np.array(table.column("predraft_hit").to_pylist(), dtype=object)
    predraft_ms = np.array(table.column("predraft_ms").to_pylist(), dtype=object)
    assert None not in predicted
    assert None not in hits[~last].tolist()
    assert None not in predraft_ms[~last].tolist()
    assert all(ms >= 0 for ms in predraft_ms[~last])
    assert any(hits[~last])


def test_round_ms_covers_critical_path():
    """round_ms is wall time, so it covers the verify compute and any drafting on the critical path."""
    target = toy_llama(2, vocab=64, logit_scale=2.0)
    with BranchPredictedDecoder(target, perturbed(target, 1.0, 5), DecodeConfig(draft_len=3, max_new_tokens=30),
                                predictor=LastValuePredictor(draft_len=3)) as decoder:
        rounds = decoder.generate([1, 2, 3, 4, 5]).rounds
    for record in rounds:
        assert record.round_ms >= record.verify_ms + record.draft_ms


class OutOfRangePredictor:
    def reset(self):
        pass

    def predict(self, features: RoundFeatures) -> Prediction:
        return Prediction(features.draft_len + 1, 2)

    def update(self, accepted, draft_len):
        pass


def test_prediction_out_of_range_rejected():
    target = toy_llama(0)
    with BranchPredictedDecoder(target, toy_llama(1), DecodeConfig(draft_len=2, max_new_tokens=4),
                                predictor=OutOfRangePredictor()) as decoder:
        with pytest.raises(DecodingError, match="0..draft_len"):
            decoder.generate([1, 2])


@pytest.mark.parametrize("kwargs,message", [
    ({"branch": BranchConfig()}, "predictor"),
    ({"predictor": StaticPredictor(), "draft_len_rule": PlusTwoMinusOne(2, 4), "branch": BranchConfig(predraft=False)},
     "not both"),
])
def test_decoder_rejects_settings(kwargs, message):
    with pytest.raises(DecodingError, match=message):
        BranchPredictedDecoder(toy_llama(0), toy_llama(1), DecodeConfig(), **kwargs)


@pytest.mark.parametrize("kwargs", [{"width": -1}, {"backend": "processes"}, {"threads_per_model": 0}])
def test_branch_config_rejects(kwargs):
    with pytest.raises(DecodingError):
        BranchConfig(**kwargs)
