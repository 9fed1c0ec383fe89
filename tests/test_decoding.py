"""The decoding loop: lossless greedy and sampled output, stops inside a round, the predictor hook, bad input."""

import numpy as np
import pytest
import scipy.stats
import torch

from bpsim.acceptance import logits_to_probs
from bpsim.decoding import DecodeConfig, DecodingError, SpeculativeDecoder, eos_token_ids, single_request
from bpsim.predictors.base import Prediction, RoundFeatures
from bpsim.sampling import SamplingConfig
from bpsim.traces import validate_trace
from decoding_helpers import (SIGNIFICANCE, CountingModel, ForcedToken, NoisyLogits, check_greedy_match,
                              greedy_references_for, reference_greedy, rounds_table, toy_llama)

MAX_NEW_TOKENS = 32  # per MT-Bench prompt in the greedy comparisons


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run single-threaded: on a small shared CPU two intra-op threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def greedy_references(real_pair, mt_bench_prompts):
    return greedy_references_for(real_pair, mt_bench_prompts, MAX_NEW_TOKENS)


# ---------------------------------------------------------------------------------------------
# Greedy decoding with the real target


@pytest.mark.slow
@pytest.mark.parametrize("draft_kind,draft_len", [("pair", 0), ("pair", 3), ("noisy", 1), ("noisy", 4)])
def test_greedy_matches_target_only(real_pair, mt_bench_prompts, greedy_references, draft_kind, draft_len):
    """Speculative greedy output equals the target's greedy output token for token.

    The "pair" draft is the real draft. The "noisy" draft is the target with noise on its
    logits. The target accepts its drafts often but not always, so acceptance runs through
    every branch.
    """
    draft = real_pair.draft.model if draft_kind == "pair" else NoisyLogits(real_pair.target.model, 2.0)
    eos = eos_token_ids(real_pair.tokenizer, real_pair.target.model)
    decoder = SpeculativeDecoder(real_pair.target.model, draft, DecodeConfig(draft_len=draft_len, max_new_tokens=MAX_NEW_TOKENS),
                                 eos_token_ids=eos, vocab_size=real_pair.vocab_size)
    all_rounds = []
    for index, (ids, (reference, gaps)) in enumerate(zip(mt_bench_prompts, greedy_references)):
        generation = decoder.generate(ids)
        check_greedy_match(list(generation.tokens), reference, gaps, f"prompt {index}, draft_len {draft_len}")
        validate_trace(rounds_table(list(generation.rounds)), f"rounds of prompt {index}")
        all_rounds.extend(generation.rounds)
    assert all(record.draft_len == draft_len for record in all_rounds)
    if draft_kind == "noisy":
        assert any(record.accepted == draft_len for record in all_rounds), "no round accepted every draft"
        assert any(record.accepted < draft_len for record in all_rounds), "no round rejected a draft"


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0, top_k=50, seed=4)],
                         ids=["greedy", "sampled"])
def test_wrong_draft_accepted_zero(real_pair, mt_bench_prompts, greedy_references, sampling):
    rare = real_pair.vocab_size - 1  # the last id, which the target gives almost no probability
    draft = ForcedToken(real_pair.draft.model, rare)
    eos = eos_token_ids(real_pair.tokenizer, real_pair.target.model)
    decoder = SpeculativeDecoder(real_pair.target.model, draft,
                                 DecodeConfig(draft_len=3, max_new_tokens=12, sampling=sampling),
                                 eos_token_ids=eos, vocab_size=real_pair.vocab_size)
    generation = decoder.generate(mt_bench_prompts[0])
    assert [record.accepted for record in generation.rounds] == [0] * len(generation.rounds)
    assert all(record.draft_tokens == (rare,) * 3 for record in generation.rounds)
    if sampling.greedy:
        reference, gaps = greedy_references[0]
        check_greedy_match(list(generation.tokens), reference[:12], gaps, "all-wrong draft")


# ---------------------------------------------------------------------------------------------
# Sampling with toy models


def exact_two_token_probs(target, prompt: list[int], sampling: SamplingConfig) -> np.ndarray:
    """P(first two new tokens) under the target alone, (vocab, vocab), enumerated exactly."""
    with torch.inference_mode():
        first = logits_to_probs(target(input_ids=torch.tensor([prompt])).logits[0, -1], sampling.temperature,
                                sampling.top_k, sampling.top_p)
        vocab = first.shape[0]
        extended = torch.tensor([prompt + [token] for token in range(vocab)])  # (vocab, prompt + 1)
        second = logits_to_probs(target(input_ids=extended).logits[:, -1], sampling.temperature,
                                 sampling.top_k, sampling.top_p)  # (vocab, vocab)
    return (first[:, None] * second).double().numpy()


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_k=3, top_p=0.9)],
                         ids=["plain", "filtered"])
def test_sampled_pairs_follow_target(sampling):
    """The first two sampled tokens follow the target's joint distribution (chi-square over vocab^2 cells).

    With draft_len 1 and two new tokens, the second token comes from every branch: the
    accepted draft's bonus token, a correction, or the next round.
    """
    vocab = 4
    # A small output scale keeps both distributions spread over the vocabulary, and different.
    target, draft = toy_llama(0, vocab, logit_scale=0.1), toy_llama(1, vocab, logit_scale=0.1)
    prompt = [1, 3, 2]
    decoder = SpeculativeDecoder(target, draft, DecodeConfig(draft_len=1, max_new_tokens=2, sampling=sampling))
    generator = torch.Generator().manual_seed(11)
    samples = 800
    probs = exact_two_token_probs(target, prompt, sampling).ravel()
    expected = probs / probs.sum() * samples
    observed = np.zeros_like(expected)
    for _ in range(samples):
        first, second = decoder.generate(prompt, generator).tokens
        observed[first * vocab + second] += 1
    possible = expected > 0
    assert observed[~possible].sum() == 0, "sampled a pair the filtered target gives probability 0"
    p_value = scipy.stats.chisquare(observed[possible], expected[possible]).pvalue
    assert p_value > SIGNIFICANCE, f"chi-square p-value {p_value:.2e}"


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0, top_k=2), SamplingConfig(temperature=1.0, top_p=0.5)],
                         ids=["top_k", "top_p"])
def test_filters_bind_target_and_draft(sampling):
    """Every sampled token lies inside the filtered target distribution at its position."""
    target, draft = toy_llama(0, vocab=8, logit_scale=0.15), toy_llama(1, vocab=8, logit_scale=0.15)
    prompt = [1, 3, 2]
    decoder = SpeculativeDecoder(target, draft, DecodeConfig(draft_len=3, max_new_tokens=8, sampling=sampling))
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        generation = decoder.generate(prompt, generator)
        sequence = prompt + list(generation.tokens)
        with torch.inference_mode():
            logits = target(input_ids=torch.tensor([sequence])).logits[0]  # (seq, vocab)
        allowed = logits_to_probs(logits[len(prompt) - 1:-1], sampling.temperature, sampling.top_k, sampling.top_p)
        for position, token in enumerate(generation.tokens):
            assert allowed[position, token] > 0, f"token {token} at position {position} is outside the filter"
        for record in generation.rounds:
            assert all(0 <= prob <= 1 for prob in record.draft_max_prob)


# ---------------------------------------------------------------------------------------------
# Stops inside a round, with a draft identical to the target so every draft is accepted


def _first_occurrences(tokens: list[int]) -> list[int]:
    return [index for index, token in enumerate(tokens) if token not in tokens[:index]]


@pytest.mark.parametrize("eos_at", ["draft", "target"])
def test_eos_ends_round(eos_at):
    target = toy_llama(3, vocab=16, logit_scale=1.0)
    prompt = [1, 2]
    reference, _ = reference_greedy(target, prompt, 30)
    # With draft_len 4 every round emits five tokens: drafts at indices 0-3, the target's at 4.
    candidates = [i for i in _first_occurrences(reference) if (1 <= i <= 3 if eos_at == "draft" else i % 5 == 4)]
    assert candidates, f"no usable EOS position in the reference {reference}"
    eos_index = candidates[0]
    eos = reference[eos_index]
    decoder = SpeculativeDecoder(target, target, DecodeConfig(draft_len=4, max_new_tokens=30), eos_token_ids=[eos])
    generation = decoder.generate(prompt)

    assert list(generation.tokens) == reference[: eos_index + 1]
    assert generation.stop_reason == "eos"
    last = generation.rounds[-1]
    assert last.finished
    assert last.tokens[-1] == eos
    if eos_at == "draft":
        assert (last.accepted, last.emitted) == (eos_index % 5 + 1, eos_index % 5 + 1)
    else:
        assert (last.accepted, last.emitted) == (4, 5)
    assert not any(record.finished for record in generation.rounds[:-1])
    validate_trace(rounds_table(list(generation.rounds)), "eos rounds")


def test_max_new_tokens_ends_round():
    target = toy_llama(2, vocab=16, logit_scale=1.0)
    reference, _ = reference_greedy(target, [1, 2], 7)
    decoder = SpeculativeDecoder(target, target, DecodeConfig(draft_len=4, max_new_tokens=7))
    generation = decoder.generate([1, 2])
    assert list(generation.tokens) == reference
    assert generation.stop_reason == "max_new_tokens"
    assert [(r.accepted, r.emitted, r.finished) for r in generation.rounds] == [(4, 5, False), (2, 2, True)]
    validate_trace(rounds_table(list(generation.rounds)), "max_new_tokens rounds")


def test_round_records_consistent():
    target, draft = toy_llama(0, vocab=16, logit_scale=1.0), toy_llama(1, vocab=16, logit_scale=1.0)
    decoder = SpeculativeDecoder(target, draft, DecodeConfig(draft_len=3, max_new_tokens=20,
                                                             sampling=SamplingConfig(temperature=1.0)))
    generation = decoder.generate([4, 5, 6], torch.Generator().manual_seed(0))
    rounds = generation.rounds
    assert sum((record.tokens for record in rounds), ()) == generation.tokens
    assert [record.position for record in rounds] == list(np.cumsum([0] + [r.emitted for r in rounds[:-1]]))
    for record in rounds:
        assert record.context_len == 3 + record.position
        assert len(record.draft_tokens) == len(record.draft_second_tokens) == len(record.draft_entropy) == 3
        assert all(second != drafted for second, drafted in zip(record.draft_second_tokens, record.draft_tokens))
        assert record.tokens[: record.accepted] == record.draft_tokens[: record.accepted]
        assert min(record.draft_ms, record.verify_ms, record.round_ms) >= 0
        assert record.predicted is None
        assert record.predraft_hit is None
        assert record.predraft_ms is None
    validate_trace(rounds_table(list(rounds)), "toy rounds")


# ---------------------------------------------------------------------------------------------
# The predictor hook


class ScriptedPredictor:
    """Predict 1 accepted draft and cycle the next draft_len through 2, 0, 3, noting when it was asked."""

    def __init__(self, target: CountingModel):
        self.target = target
        self.calls = []
        self.updates = []
        self.resets = 0

    def reset(self):
        self.resets += 1

    def predict(self, features: RoundFeatures) -> Prediction:
        self.calls.append((features, self.target.calls))
        return Prediction(predicted=min(1, features.draft_len), next_draft_len=(2, 0, 3)[len(self.calls) % 3])

    def update(self, accepted: int, draft_len: int) -> None:
        self.updates.append((accepted, draft_len))


def test_predictor_sets_next_draft_len():
    target = CountingModel(toy_llama(0, vocab=16, logit_scale=1.0))
    predictor = ScriptedPredictor(target)
    decoder = SpeculativeDecoder(target, toy_llama(1, vocab=16, logit_scale=1.0),
                                 DecodeConfig(draft_len=1, max_new_tokens=12), predictor=predictor)
    generation = decoder.generate([1, 2, 3])
    rounds = generation.rounds
    assert predictor.resets == 1
    assert [record.draft_len for record in rounds] == [1] + [(2, 0, 3)[i % 3] for i in range(1, len(rounds))]
    assert [record.predicted for record in rounds] == [min(1, record.draft_len) for record in rounds]
    assert predictor.updates == [(record.accepted, record.draft_len) for record in rounds]
    for index, (features, target_calls) in enumerate(predictor.calls):
        assert features.draft_len == rounds[index].draft_len
        assert features.draft_max_prob == pytest.approx(rounds[index].draft_max_prob)
        assert features.position == rounds[index].position
        # The prefill and one verification per earlier round: this round's verification has not run.
        assert target_calls == 1 + index


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("input_ids", [torch.ones(2, 4, dtype=torch.long), [[1, 2], [3, 4]]], ids=["tensor", "lists"])
def test_batch_rejected(input_ids):
    with pytest.raises(DecodingError, match="batch size 1"):
        single_request(input_ids)


@pytest.mark.parametrize("input_ids", [torch.tensor([[1, 2, 3]]), [[1, 2, 3]], torch.tensor([1, 2, 3]), (1, 2, 3)])
def test_single_request_forms(input_ids):
    assert single_request(input_ids) == [1, 2, 3]


def test_empty_prompt_rejected():
    with pytest.raises(DecodingError, match="empty"):
        single_request([])


def test_decoder_rejects_batch():
    target = toy_llama(0)
    decoder = SpeculativeDecoder(target, None, DecodeConfig(draft_len=0, max_new_tokens=2))
    with pytest.raises(DecodingError, match="batch size 1"):
        decoder.generate(torch.ones(3, 2, dtype=torch.long))


def test_draft_len_needs_draft():
    with pytest.raises(DecodingError, match="draft model"):
        SpeculativeDecoder(toy_llama(0), None, DecodeConfig(draft_len=2))


@pytest.mark.parametrize("kwargs", [{"draft_len": -1}, {"draft_len": 1.5}, {"draft_len": 40000},
                                    {"max_new_tokens": 0}, {"sampling": {"temperature": 1.0}}])
def test_decode_config_rejects(kwargs):
    with pytest.raises(DecodingError):
        DecodeConfig(**kwargs)
