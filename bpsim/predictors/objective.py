"""The speed objective that turns an acceptance distribution into a prediction and a draft_len.

A round with draft_len n whose accepted count A has pmf P_n over 0..n emits A + 1 tokens. With
branch prediction the next round's drafts are started from the predicted branch point j while
the target verifies; they are kept when A == j and the guessed branch token is right. The guess
is right with probability g(j): ``bonus_guess_rate`` at j = n (the draft's own next token equals
the target's bonus token) and ``correction_guess_rate`` at j < n (the draft's second-best token
equals the target's correction). So the chance that the pre-draft is kept is P_n(j) g(j), and the
predicted count is

    predicted = argmax_j P_n(j) g(j),

which is the mode only when both guess rates are equal. Following ``bpsim.latency``, every
pre-draft costs its round ``predraft_cost(m, verify_ms(m + 1))``, hit or miss, and a kept one
spares the next round its drafting.

The next draft_len m maximises the stationary speed of rounds that all draft m tokens:

    speed(m)  = (E_m[A] + 1) / (verify_ms(m + 1, ctx) + (1 - hit(m)) draft_ms(m) + predraft_cost(m, verify_ms(m + 1, ctx))),
    hit(m)    = max_j P_m(j) g(j),

over the candidate lengths, 0 (plain target decoding, speed 1 / verify_ms(1, ctx)) included. A
decoder that does not pre-draft neither pays for a pre-draft nor gains from a hit, so then

    speed(m)  = (E_m[A] + 1) / (verify_ms(m + 1, ctx) + draft_ms(m)).
"""

from __future__ import annotations

import numpy as np

from bpsim.latency import LatencyModel


def guess_weights(draft_len: int, bonus_guess_rate: float, correction_guess_rate: float) -> np.ndarray:
    """Return g(j) for j = 0..draft_len: the probability that the guessed branch token is right."""
    weights = np.full(draft_len + 1, float(correction_guess_rate))
    weights[draft_len] = bonus_guess_rate
    return weights


def choose_predicted(pmf: np.ndarray, bonus_guess_rate: float, correction_guess_rate: float) -> np.ndarray:
    """Return argmax_j P(j) g(j) for a pmf of shape (..., draft_len + 1); ties go to the smaller j."""
    pmf = np.asarray(pmf, dtype=float)
    draft_len = pmf.shape[-1] - 1
    return np.argmax(pmf * guess_weights(draft_len, bonus_guess_rate, correction_guess_rate), axis=-1)


def stationary_speed(pmfs: dict[int, np.ndarray], latency: LatencyModel, context_len,
                     bonus_guess_rate: float, correction_guess_rate: float,
                     predraft: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(lengths, speed)``: candidate draft lengths (sorted, 0 added) and tokens/ms, (contexts, lengths).

    ``pmfs`` maps each candidate draft_len m > 0 to the pmf of the accepted count over 0..m.
    ``predraft`` False scores a decoder that drafts each round after the previous verdict.
    """
    context = np.atleast_1d(np.asarray(context_len, dtype=float))  # (contexts,)
    lengths = np.array(sorted({0, *(int(m) for m in pmfs)}), dtype=np.int64)
    speed = np.empty((len(context), len(lengths)))
    for column, m in enumerate(lengths):
        if m == 0:
            speed[:, column] = 1.0 / latency.verify_ms(1, context)
            continue
        pmf = np.asarray(pmfs[m], dtype=float)
        tokens = float((np.arange(m + 1) * pmf).sum()) + 1.0
        hit = float((pmf * guess_weights(m, bonus_guess_rate, correction_guess_rate)).max())
        verify = latency.verify_ms(m + 1, context)
        draft = float(latency.draft_ms(m))
        if predraft:
            speed[:, column] = tokens / (verify + (1.0 - hit) * draft + latency.predraft_cost_ms(m, verify))
        else:
            speed[:, column] = tokens / (verify + draft)
    return lengths, speed


def choose_draft_len(pmfs: dict[int, np.ndarray], latency: LatencyModel, context_len,
                     bonus_guess_rate: float, correction_guess_rate: float, predraft: bool = True) -> np.ndarray:
    """Return the speed-maximising draft_len for each context length, shape like ``context_len`` (at least 1-d)."""
    lengths, speed = stationary_speed(pmfs, latency, context_len, bonus_guess_rate, correction_guess_rate,
                                      predraft)
    return lengths[np.argmax(speed, axis=1)]


def check_rate(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def latency_from_param(latency) -> LatencyModel:
    """Accept a LatencyModel or its ``to_dict()`` form, so configs stay JSON."""
    if isinstance(latency, LatencyModel):
        return latency
    if isinstance(latency, dict):
        return LatencyModel.from_dict(latency)
    raise ValueError(f"latency must be a LatencyModel or its to_dict() form, got {type(latency).__name__}")
