"""Acceptance math: logit processing, greedy and sampling acceptance, and sampling settings."""

import numpy as np
import pytest
import scipy.stats
import torch

from bpsim import acceptance
from bpsim.acceptance import (
    draft_confidence,
    greedy_accept,
    logits_to_probs,
    residual_probs,
    sample_accept,
)
from bpsim.sampling import SamplingConfig, SamplingConfigError, request_generator

# A chi-square p-value below this rejects "the output follows the target's distribution".
SIGNIFICANCE = 1e-3


# ---------------------------------------------------------------------------------------------
# Logit processing


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    expected = torch.softmax(logits / 0.7, dim=-1)
    assert torch.allclose(logits_to_probs(logits, 0.7), expected)


def test_temperature_zero_rejected():
    with pytest.raises(ValueError, match="greedy"):
        logits_to_probs(torch.zeros(3), 0.0)


def test_top_k_keeps_k_largest():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    probs = logits_to_probs(logits, 1.0, top_k=2)
    kept = torch.softmax(torch.tensor([3.0, 2.0]), dim=-1)
    assert torch.allclose(probs, torch.tensor([0.0, kept[0], 0.0, kept[1]]))


def test_top_k_keeps_ties():
    probs = logits_to_probs(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1.0, top_k=1)
    assert torch.allclose(probs, torch.tensor([0.0, 0.5, 0.5, 0.0]))


def test_top_p_keeps_smallest_covering_set():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    kept_two = logits_to_probs(logits, 1.0, top_p=0.8)
    assert torch.allclose(kept_two, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    kept_three = logits_to_probs(logits, 1.0, top_p=0.81)
    assert torch.allclose(kept_three, torch.tensor([0.15, 0.5, 0.0, 0.3]) / 0.95)
    only_max = logits_to_probs(logits, 1.0, top_p=1e-6)
    assert torch.allclose(only_max, torch.tensor([0.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 0.9), (0.7, 5, 1.0), (1.3, 8, 0.75), (0.5, 3, 0.5)])
def test_processing_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(6, 20) * 2  # (rows, vocab)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone()), dim=-1)
    assert torch.allclose(logits_to_probs(logits, temperature, top_k, top_p), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Greedy acceptance


@pytest.mark.parametrize("draft,target_argmax,accepted,token", [
    ([4, 2, 7], [4, 2, 7, 1], 3, 1),  # all accepted: the target's bonus token follows
    ([4, 2, 7], [4, 3, 7, 1], 1, 3),  # second draft rejected: the target's correction follows
    ([4, 2, 7], [5, 2, 7, 1], 0, 5),  # later matches after a rejection do not count
    ([], [6], 0, 6),  # draft_len 0: the target's own token
])
def test_greedy_accept_cases(draft, target_argmax, accepted, token):
    target_logits = torch.nn.functional.one_hot(torch.tensor(target_argmax), 10).float()  # (draft_len + 1, vocab)
    assert greedy_accept(torch.tensor(draft, dtype=torch.long), target_logits) == (accepted, token)


# ---------------------------------------------------------------------------------------------
# Sampling acceptance


def _toy_distributions(draft_len: int, vocab: int, seed: int):
    """Per-position target and draft distributions that differ clearly, (draft_len + 1, vocab) and (draft_len, vocab)."""
    rng = np.random.default_rng(seed)
    target_probs = torch.tensor(rng.dirichlet(np.full(vocab, 0.8), size=draft_len + 1), dtype=torch.float32)
    draft_probs = torch.tensor(rng.dirichlet(np.full(vocab, 0.8), size=draft_len), dtype=torch.float32)
    return target_probs, draft_probs


def _sample_outputs(target_probs, draft_probs, samples: int, seed: int) -> list[list[int]]:
    """Run one round ``samples`` times: drafts drawn from the draft rows, then sampling acceptance."""
    generator = torch.Generator().manual_seed(seed)
    draft_len = draft_probs.shape[0]
    outputs = []
    for _ in range(samples):
        drafts = torch.multinomial(draft_probs, 1, generator=generator)[:, 0] if draft_len else torch.zeros(0, dtype=torch.long)
        accepted, token = sample_accept(drafts, draft_probs, target_probs, generator)
        outputs.append(drafts[:accepted].tolist() + [token])
    return outputs


def _chi_square_p_values(outputs: list[list[int]], target_probs: torch.Tensor) -> list[float]:
    """p-values that the token at each round position follows that position's target row.

    Position i is reached when the first i drafts were accepted. In these toy rows the target's
    distribution does not depend on earlier tokens, so the token there must follow row i.
    """
    vocab = target_probs.shape[1]
    p_values = []
    for position in range(target_probs.shape[0]):
        tokens = [output[position] for output in outputs if len(output) > position]
        if len(tokens) < 200:
            continue
        observed = np.bincount(tokens, minlength=vocab)
        expected = target_probs[position].double().numpy() * len(tokens)
        p_values.append(scipy.stats.chisquare(observed, expected / expected.sum() * len(tokens)).pvalue)
    return p_values


@pytest.mark.parametrize("draft_len", [0, 1, 2, 4])
@pytest.mark.parametrize("vocab", [3, 6])
def test_sampled_output_follows_target(draft_len, vocab):
    target_probs, draft_probs = _toy_distributions(draft_len, vocab, seed=draft_len * 10 + vocab)
    outputs = _sample_outputs(target_probs, draft_probs, samples=4000, seed=1)
    p_values = _chi_square_p_values(outputs, target_probs)
    assert p_values, "no round position was reached often enough to test"
    assert min(p_values) > SIGNIFICANCE, f"per-position p-values {p_values}"


def test_wrong_residual_detected(monkeypatch):
    """The same chi-square test must reject a sampler that resamples rejections from p instead of norm(max(0, p - q))."""
    target_probs, draft_probs = _toy_distributions(2, 4, seed=7)
    monkeypatch.setattr(acceptance, "residual_probs", lambda target, draft: target)
    outputs = _sample_outputs(target_probs, draft_probs, samples=4000, seed=1)
    p_values = _chi_square_p_values(outputs, target_probs)
    assert min(p_values) < SIGNIFICANCE, f"a wrong residual went undetected: p-values {p_values}"


def test_wrong_drafts_never_accepted():
    """A draft certain of a token the target gives probability 0 is rejected at every position."""
    target_probs = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    draft_probs = torch.tensor([[0.0, 0.0, 1.0]] * 3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        accepted, token = sample_accept(torch.tensor([2, 2, 2]), draft_probs, target_probs, generator)
        assert accepted == 0
        assert token in (0, 1)


def test_identical_draft_always_accepted():
    target_probs, _ = _toy_distributions(3, 5, seed=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        drafts = torch.multinomial(target_probs[:3], 1, generator=generator)[:, 0]
        accepted, _ = sample_accept(drafts, target_probs[:3], target_probs, generator)
        assert accepted == 3


def test_residual_is_normalised_positive_part():
    target_probs = torch.tensor([0.5, 0.3, 0.2])
    draft_probs = torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual_probs(target_probs, draft_probs), torch.tensor([1.0, 0.0, 0.0]))


def test_residual_falls_back_to_target():
    target_probs = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    draft_probs = torch.tensor([[0.25, 0.75], [0.4, 0.6]])
    residual = residual_probs(target_probs, draft_probs)
    assert torch.allclose(residual[0], target_probs[0])
    assert torch.allclose(residual[1], torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# Draft confidence


def test_draft_confidence_values():
    draft_probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    max_prob, entropy, second = draft_confidence(draft_probs, torch.tensor([1, 2]))
    assert torch.allclose(max_prob, torch.tensor([0.6, 0.5]))
    expected_entropy = scipy.stats.entropy(draft_probs.numpy(), axis=1)  # nats
    assert np.allclose(entropy.numpy(), expected_entropy, atol=1e-6)
    assert second.tolist() == [2, 0]  # best token other than the drafted one


# ---------------------------------------------------------------------------------------------
# Sampling settings


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_k": 0}, {"top_k": 2.5}, {"top_k": True},
    {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": float("nan")},
    {"seed": -1}, {"seed": 1.0},
])
def test_sampling_config_rejects(kwargs):
    with pytest.raises(SamplingConfigError):
        SamplingConfig(**kwargs)


def test_sampling_config_greedy_flag():
    assert SamplingConfig().greedy
    assert not SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, seed=3).greedy


def test_request_generator_reproducible():
    first = torch.rand(4, generator=request_generator(5, 2))
    again = torch.rand(4, generator=request_generator(5, 2))
    other = torch.rand(4, generator=request_generator(5, 3))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
