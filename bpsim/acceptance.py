"""Acceptance math of speculative decoding, as small pure functions on tensors.

Sampling acceptance follows Leviathan et al. 2023 (arXiv 2211.17192) and Chen et al. 2023
(arXiv 2302.01318): draft token x is accepted with probability min(1, p(x)/q(x)), where p is
the target's distribution and q the draft's, both after temperature, top-k and top-p. The
first rejected position is replaced by a sample from norm(max(0, p - q)), and when every
draft is accepted the target adds a bonus token sampled from p. The output is then
distributed exactly as the target alone would sample it.
"""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float = 1.0) -> torch.Tensor:
    """Turn logits ``(..., vocab)`` into probabilities ``(..., vocab)`` after temperature, top-k and top-p.

    The filters run in that order, as in transformers' sampling. Top-k keeps every token tied
    with the k-th largest logit. Top-p keeps the smallest set of most probable tokens whose
    mass reaches ``top_p``, and always at least the most probable token.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to define probabilities, got {temperature}; "
                         "greedy decoding takes the argmax of the logits instead")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (..., vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (..., vocab)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (..., vocab)
        remove_sorted = mass_before >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
        probs = probs.masked_fill(remove, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_token(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id from ``probs`` (vocab,); returns a 0-d long tensor on the same device."""
    return torch.multinomial(probs, 1, generator=generator)[0]


def residual_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """Return norm(max(0, p - q)) over the last axis: the distribution a rejected position is resampled from.

    A rejection implies p(x) < q(x) for the drafted x, so the positive part has positive mass.
    Where rounding leaves none (p equal to q), the result falls back to p, which is what the
    target alone would sample there.
    """
    residual = (target_probs - draft_probs).clamp(min=0.0)  # (..., vocab)
    mass = residual.sum(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(residual.dtype).tiny), target_probs)


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Return ``(accepted, token)`` under greedy decoding.

    ``draft_tokens`` (draft_len,) are the drafts and ``target_logits`` (draft_len + 1, vocab)
    the target's logits after the last context token and after each draft. ``accepted`` is the
    length of the longest prefix of drafts equal to the target's argmax, and ``token`` is the
    target's argmax right after that prefix (its correction, or its bonus token when every
    draft matched).
    """
    target_tokens = target_logits.argmax(dim=-1)  # (draft_len + 1,)
    matches = draft_tokens == target_tokens[:-1]  # (draft_len,)
    accepted = int(matches.long().cumprod(dim=0).sum())
    return accepted, int(target_tokens[accepted])


def sample_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[int, int]:
    """Return ``(accepted, token)`` under speculative sampling.

    ``draft_tokens`` (draft_len,) were sampled from ``draft_probs`` (draft_len, vocab), and
    ``target_probs`` (draft_len + 1, vocab) is the target's distribution after the last
    context token and after each draft. Draft x is accepted with probability
    min(1, p(x)/q(x)), and the first rejected position draws ``token`` from
    ``residual_probs``. When every draft is accepted, ``token`` is the bonus token drawn from
    the last row of ``target_probs``.
    """
    draft_len = draft_tokens.shape[0]
    positions = torch.arange(draft_len, device=draft_tokens.device)
    target_at_draft = target_probs[positions, draft_tokens]  # (draft_len,)
    draft_at_draft = draft_probs[positions, draft_tokens]  # (draft_len,)
    uniform = torch.rand(draft_len, generator=generator, device=target_probs.device)  # (draft_len,)
    # u < p/q written as u * q < p: no division, and a draft the target gives p = 0 is always rejected.
    rejected = (uniform * draft_at_draft >= target_at_draft).nonzero()  # (rejections, 1)
    if rejected.numel() == 0:
        return draft_len, int(sample_token(target_probs[draft_len], generator))
    accepted = int(rejected[0, 0])
    token = sample_token(residual_probs(target_probs[accepted], draft_probs[accepted]), generator)
    return accepted, int(token)


def draft_confidence(draft_probs: torch.Tensor, draft_tokens: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the draft's ``(max_prob, entropy, second_tokens)`` per drafted position, each (draft_len,).

    ``draft_probs`` is (draft_len, vocab) and entropy is in nats. ``second_tokens`` contains the
    most probable token other than the drafted one. After a rejection the target's token is
    never the rejected draft (its residual probability is 0), so this is the natural guess
    for the correction token. Under greedy drafting it is the draft's second-best token.
    """
    max_prob = draft_probs.max(dim=-1).values  # (draft_len,)
    entropy = torch.special.entr(draft_probs).sum(dim=-1)  # (draft_len,)
    others = draft_probs.scatter(-1, draft_tokens[:, None], -1.0)  # (draft_len, vocab)
    second_tokens = others.argmax(dim=-1)  # (draft_len,)
    return max_prob, entropy, second_tokens
