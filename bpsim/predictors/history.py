"""History predictors: guess this round's accepted count from the verdicts of earlier rounds of the request.

Families, after the branch predictors of CPUs and the draft-length rules of other engines:

- ``last-value``: the previous round's accepted count.
- ``exp-average``: an exponential moving average of accepted counts, rounded.
- ``saturating-counter``: a ``bits``-bit counter that counts up after a fully accepted round and
  down otherwise. While it is in its upper half the guess is "all accepted", else the last
  count below draft_len.
- ``two-level``: a pattern-history table indexed by the last ``history`` outcomes (an outcome is
  "all accepted" or the accepted count, capped at ``max_symbol``); each entry counts the outcomes
  that followed its pattern and the guess is the most frequent one. The table can be fitted on
  traces, keeps counting within a request, and returns to its fitted state on ``reset``.
- ``one-bit``: the last outcome switch. After a fully accepted round guess "all accepted" and draft
  ``high_draft_len`` tokens, otherwise guess 0 and draft ``low_draft_len``.
- ``plus2-minus1``: the draft-length heuristic of Hugging Face transformers' assisted generation
  (``num_assistant_tokens_schedule="heuristic"`` in ``generation/candidate_generator.py``): add 2
  tokens after a fully accepted round, else remove 1, never below 1. The guess is the last value.

The next draft_len must be fixed before the verdict arrives, because the pre-draft starts while
the target verifies. So every draft-length rule here is applied to the predicted outcome, where
transformers applies the heuristic to the real one. ``length_rule`` chooses the rule for the
families without their own: ``fixed`` (always ``draft_len``), ``follow`` (predicted + 1) or
``plus2-minus1``; results are clipped to 1..max_draft_len.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from bpsim.predictors.base import BatchFeatures, Prediction, Predictor, RoundFeatures

LENGTH_RULES = ("fixed", "follow", "plus2-minus1")


def apply_length_rule(rule: str, predicted, draft_len, fixed: int, max_draft_len: int):
    """Return the next draft_len from this round's predicted count and draft_len (scalars or arrays)."""
    predicted, draft_len = np.asarray(predicted), np.asarray(draft_len)
    if rule == "fixed":
        return np.full(np.shape(predicted), fixed, dtype=np.int64)
    if rule == "follow":
        proposed = predicted + 1
    else:
        proposed = np.where(predicted >= draft_len, draft_len + 2, draft_len - 1)
    return np.clip(proposed, 1, max_draft_len).astype(np.int64)


def request_starts(request_id: np.ndarray) -> np.ndarray:
    """Flag the first round of each request, (rounds,) bool; rounds of a request are contiguous."""
    request_id = np.asarray(request_id)
    starts = np.ones(len(request_id), dtype=bool)
    starts[1:] = request_id[1:] != request_id[:-1]
    return starts


def previous_in_request(values: np.ndarray, starts: np.ndarray, fill) -> np.ndarray:
    """Shift ``values`` down by one round, with ``fill`` at each request's first round."""
    shifted = np.empty(len(values), dtype=np.result_type(np.asarray(values).dtype, np.asarray(fill).dtype))
    if len(values):
        shifted[1:] = values[:-1]
    shifted[starts] = np.asarray(fill)[starts] if np.ndim(fill) else fill
    return shifted


class HistoryPredictor(Predictor):
    """Shared draft-length rule and parameters of the history families."""

    def __init__(self, draft_len: int = 4, max_draft_len: int = 8, length_rule: str = "fixed"):
        if length_rule not in LENGTH_RULES:
            raise ValueError(f"length_rule must be one of {', '.join(LENGTH_RULES)}, got {length_rule!r}")
        if not 0 <= draft_len <= max_draft_len or max_draft_len < 1:
            raise ValueError(f"need 0 <= draft_len <= max_draft_len and max_draft_len >= 1, got "
                             f"draft_len={draft_len}, max_draft_len={max_draft_len}")
        self.draft_len, self.max_draft_len, self.length_rule = int(draft_len), int(max_draft_len), length_rule
        self.reset()

    def next_len(self, predicted, draft_len):
        return apply_length_rule(self.length_rule, predicted, draft_len, self.draft_len, self.max_draft_len)

    def common_params(self) -> dict:
        return {"draft_len": self.draft_len, "max_draft_len": self.max_draft_len, "length_rule": self.length_rule}

    def guess(self, draft_len: int) -> int:
        raise NotImplementedError

    def predict(self, features: RoundFeatures) -> Prediction:
        predicted = min(max(int(self.guess(features.draft_len)), 0), features.draft_len)
        return Prediction(predicted, int(self.next_len(predicted, features.draft_len)))

    def batch_guess(self, features: BatchFeatures, accepted: np.ndarray) -> np.ndarray | None:
        """Vectorised guesses (before clipping to draft_len), or None when the family has no closed form."""
        return None

    def predict_batch(self, features: BatchFeatures, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        guess = self.batch_guess(features, np.asarray(accepted))
        if guess is None:
            return super().predict_batch(features, accepted)
        draft_len = np.asarray(features.draft_len, dtype=np.int64)
        predicted = np.clip(np.rint(guess).astype(np.int64), 0, draft_len)
        return predicted, self.next_len(predicted, draft_len)


class LastValuePredictor(HistoryPredictor):
    """Guess the previous round's accepted count; the first round of a request guesses all accepted."""

    family = "last-value"

    def reset(self) -> None:
        self.last = None

    def guess(self, draft_len: int) -> int:
        return draft_len if self.last is None else self.last

    def update(self, accepted: int, draft_len: int) -> None:
        self.last = accepted

    def params(self) -> dict:
        return self.common_params()

    def batch_guess(self, features, accepted):
        starts = request_starts(features.request_id)
        return previous_in_request(accepted.astype(np.int64), starts, np.asarray(features.draft_len, dtype=np.int64))


class PlusTwoMinusOnePredictor(LastValuePredictor):
    """The last-value guess with the +2/-1 draft-length heuristic; ``draft_len`` is unused by the rule."""

    family = "plus2-minus1"

    def __init__(self, draft_len: int = 4, max_draft_len: int = 8):
        super().__init__(draft_len, max_draft_len, "plus2-minus1")

    def params(self) -> dict:
        return {"draft_len": self.draft_len, "max_draft_len": self.max_draft_len}


class ExpAveragePredictor(HistoryPredictor):
    """Guess round(mean), where mean <- (1 - alpha) mean + alpha accepted after each round.

    The mean starts at ``initial`` accepted drafts each request.
    """

    family = "exp-average"

    def __init__(self, alpha: float = 0.5, initial: float = 2.0, **common):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if initial < 0:
            raise ValueError(f"initial must be >= 0, got {initial}")
        self.alpha, self.initial = float(alpha), float(initial)
        super().__init__(**common)

    def reset(self) -> None:
        self.mean = self.initial

    def guess(self, draft_len: int) -> int:
        return int(np.rint(self.mean))

    def update(self, accepted: int, draft_len: int) -> None:
        self.mean = (1.0 - self.alpha) * self.mean + self.alpha * accepted

    def params(self) -> dict:
        return {"alpha": self.alpha, "initial": self.initial, **self.common_params()}

    def batch_guess(self, features, accepted):
        starts = np.flatnonzero(request_starts(features.request_id))
        guess = np.empty(len(accepted))
        bounds = np.r_[starts, len(accepted)]
        for begin, end in zip(bounds[:-1], bounds[1:]):
            # mean_i = (1 - alpha) mean_{i-1} + alpha accepted_{i-1} with mean_0 = initial; lfilter
            # runs the same multiply-adds as ``update``, so both paths round alike.
            guess[begin] = self.initial
            initial_state = signal.lfiltic([1.0], [1.0, -(1.0 - self.alpha)], [self.initial])
            guess[begin + 1:end], _ = signal.lfilter([1.0], [1.0, -(1.0 - self.alpha)],
                                                     self.alpha * accepted[begin:end - 1], zi=initial_state)
        return guess


class SaturatingCounterPredictor(HistoryPredictor):
    """A ``bits``-bit up/down counter on "all accepted"; in its lower half guess the last partial count."""

    family = "saturating-counter"

    def __init__(self, bits: int = 2, **common):
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must lie in 1..8, got {bits}")
        self.bits = int(bits)
        super().__init__(**common)

    def reset(self) -> None:
        self.counter = 1 << (self.bits - 1)  # weakly "all accepted"
        self.last_partial = 0

    def guess(self, draft_len: int) -> int:
        return draft_len if self.counter >= 1 << (self.bits - 1) else self.last_partial

    def update(self, accepted: int, draft_len: int) -> None:
        if accepted >= draft_len:
            self.counter = min(self.counter + 1, (1 << self.bits) - 1)
        else:
            self.counter = max(self.counter - 1, 0)
            self.last_partial = accepted

    def params(self) -> dict:
        return {"bits": self.bits, **self.common_params()}


class TwoLevelPredictor(HistoryPredictor):
    """A pattern-history table over the last ``history`` outcomes.

    Outcome symbols are 0..max_symbol for a partial count (capped) and ``max_symbol + 1`` for "all
    accepted". A pattern is the comma-joined symbols, oldest first, with -1 for rounds before the
    request began. ``table`` maps a pattern to the counts of the symbol that followed it.
    """

    family = "two-level"

    def __init__(self, history: int = 2, max_symbol: int = 8, table: dict | None = None, **common):
        if not 1 <= history <= 8:
            raise ValueError(f"history must lie in 1..8, got {history}")
        if max_symbol < 0:
            raise ValueError(f"max_symbol must be >= 0, got {max_symbol}")
        self.history, self.max_symbol = int(history), int(max_symbol)
        self.fitted_table = {}
        for pattern, counts in (table or {}).items():
            counts = [float(c) for c in counts]
            if len(counts) != self.max_symbol + 2 or min(counts) < 0:
                raise ValueError(f"table[{pattern!r}] must hold {self.max_symbol + 2} non-negative counts")
            self.fitted_table[str(pattern)] = counts
        super().__init__(**common)

    def symbol(self, accepted: int, draft_len: int) -> int:
        return self.max_symbol + 1 if accepted >= draft_len else min(accepted, self.max_symbol)

    def reset(self) -> None:
        self.recent = [-1] * self.history
        self.table = {pattern: list(counts) for pattern, counts in self.fitted_table.items()}

    def pattern(self) -> str:
        return ",".join(map(str, self.recent))

    def guess(self, draft_len: int) -> int:
        counts = self.table.get(self.pattern())
        if not counts or max(counts) == 0:
            return draft_len
        best = int(np.argmax(counts))
        return draft_len if best == self.max_symbol + 1 else best

    def update(self, accepted: int, draft_len: int) -> None:
        symbol = self.symbol(accepted, draft_len)
        counts = self.table.setdefault(self.pattern(), [0.0] * (self.max_symbol + 2))
        counts[symbol] += 1.0
        self.recent = self.recent[1:] + [symbol]

    def params(self) -> dict:
        return {"history": self.history, "max_symbol": self.max_symbol, "table": self.fitted_table,
                **self.common_params()}

    @classmethod
    def fit(cls, request_id, recorded_draft_len, accepted, history: int = 2, max_symbol: int = 8, **common
            ) -> "TwoLevelPredictor":
        """Count, over recorded rounds, which outcome followed each pattern; return the fitted predictor.

        ``common`` contains the draft-length options (``draft_len``, ``max_draft_len``, ``length_rule``).
        """
        learner = cls(history=history, max_symbol=max_symbol, **common)
        learner.reset()
        previous = None
        for request, n, k in zip(np.asarray(request_id).tolist(), np.asarray(recorded_draft_len).tolist(),
                                 np.asarray(accepted).tolist()):
            if request != previous:
                learner.recent = [-1] * history
                previous = request
            learner.update(int(k), int(n))
        return cls(history=history, max_symbol=max_symbol, table=learner.table, **common)


class OneBitPredictor(Predictor):
    """The one-bit last-outcome switch between drafting ``high_draft_len`` and ``low_draft_len`` tokens."""

    family = "one-bit"

    def __init__(self, high_draft_len: int = 6, low_draft_len: int = 1):
        if not 0 <= low_draft_len <= high_draft_len or high_draft_len < 1:
            raise ValueError(f"need 0 <= low_draft_len <= high_draft_len and high_draft_len >= 1, got "
                             f"{low_draft_len}, {high_draft_len}")
        self.high_draft_len, self.low_draft_len = int(high_draft_len), int(low_draft_len)
        self.reset()

    def reset(self) -> None:
        self.all_accepted = True

    def predict(self, features: RoundFeatures) -> Prediction:
        if self.all_accepted:
            return Prediction(features.draft_len, self.high_draft_len)
        return Prediction(0, self.low_draft_len)

    def update(self, accepted: int, draft_len: int) -> None:
        self.all_accepted = accepted >= draft_len

    def params(self) -> dict:
        return {"high_draft_len": self.high_draft_len, "low_draft_len": self.low_draft_len}

    def predict_batch(self, features: BatchFeatures, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        draft_len = np.asarray(features.draft_len, dtype=np.int64)
        full = np.asarray(accepted) >= draft_len
        bit = previous_in_request(full, request_starts(features.request_id), True).astype(bool)
        predicted = np.where(bit, draft_len, 0)
        return predicted.astype(np.int64), np.where(bit, self.high_draft_len, self.low_draft_len).astype(np.int64)
