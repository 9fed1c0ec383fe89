"""Distribution predictors: a fitted law of the accepted count, turned into choices by the speed objective.

Each family gives the pmf of the accepted count A of a round with draft_len n, over 0..n:

- ``binomial``: Binomial(n, p). Every draft is judged independently, which a prefix rule does not do.
- ``capped-geometric``: a constant per-token acceptance rate a with the count stopped at the first
  rejection, P(k) = a^k (1 - a) for k < n and P(n) = a^n. It is censored at n, not renormalised the
  way ``scipy.stats.geom`` truncated to 0..n would be.
- ``beta-binomial``: Binomial(n, p) with p ~ Beta(alpha, beta) per round, for over-dispersion.
- ``beta-geometric``: the capped geometric with a ~ Beta(alpha, beta) per round,
  P(k) = B(alpha + k, beta + 1) / B(alpha, beta) for k < n and P(n) = B(alpha + n, beta) / B(alpha, beta).
- ``empirical``: the observed histogram of each draft_len, add-``smoothing`` smoothed.

The predicted count and the next draft_len both come from ``bpsim.predictors.objective``: the count
maximises the chance that the pre-draft is kept, and the draft_len maximises expected tokens per
ms under the latency model. These predictors keep no history, so ``update`` and ``reset`` do nothing.
"""

from __future__ import annotations

import abc

import numpy as np
from scipy import special, stats

from bpsim.predictors.base import BatchFeatures, Prediction, Predictor, RoundFeatures
from bpsim.predictors.objective import (check_rate, choose_draft_len, choose_predicted, latency_from_param)

DEFAULT_MAX_DRAFT_LEN = 8


# Log-pmfs of the accepted count k of rounds with draft_len n; k and n are broadcast arrays.

def binomial_logpmf(k, n, p):
    return stats.binom.logpmf(k, n, p)


def capped_geometric_logpmf(k, n, rate):
    """log P(k) of the capped geometric; ``scipy.stats.geom`` counts trials, so a^k (1 - a) is geom.pmf(k + 1, 1 - a)."""
    k, n = np.asarray(k), np.asarray(n)
    inside = stats.geom.logpmf(k + 1, 1.0 - rate)
    censored = stats.geom.logsf(n, 1.0 - rate)
    return np.where(k < n, inside, censored)


def beta_binomial_logpmf(k, n, alpha, beta):
    return stats.betabinom.logpmf(k, n, alpha, beta)


def beta_geometric_logpmf(k, n, alpha, beta):
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    inside = special.betaln(alpha + k, beta + 1.0)
    censored = special.betaln(alpha + n, beta)
    return np.where(k < n, inside, censored) - special.betaln(alpha, beta)


def _pmf(logpmf, draft_len: int, *params) -> np.ndarray:
    k = np.arange(draft_len + 1)
    return np.exp(logpmf(k, draft_len, *params))


class DistributionPredictor(Predictor):
    """Shared predict/predict_batch for families defined by a pmf per draft_len.

    ``latency`` is a LatencyModel or its ``to_dict()``; ``draft_lens`` are the candidate next
    draft lengths (default 1..max_draft_len; 0 is always a candidate). ``predraft`` says whether
    the decoder pre-drafts beside verification, which changes what each draft_len costs.
    """

    def __init__(self, latency, max_draft_len: int = DEFAULT_MAX_DRAFT_LEN, draft_lens=None,
                 bonus_guess_rate: float = 1.0, correction_guess_rate: float = 1.0, predraft: bool = True):
        if not isinstance(predraft, bool):
            raise ValueError(f"predraft must be true or false, got {predraft!r}")
        self.predraft = predraft
        self.latency = latency_from_param(latency)
        if max_draft_len < 1:
            raise ValueError(f"max_draft_len must be >= 1, got {max_draft_len}")
        self.max_draft_len = int(max_draft_len)
        lengths = range(1, self.max_draft_len + 1) if draft_lens is None else draft_lens
        self.draft_lens = sorted({int(m) for m in lengths if int(m) > 0})
        self.bonus_guess_rate = check_rate("bonus_guess_rate", bonus_guess_rate)
        self.correction_guess_rate = check_rate("correction_guess_rate", correction_guess_rate)
        self._explicit_draft_lens = draft_lens is not None
        self._candidates: dict[int, np.ndarray] | None = None

    @abc.abstractmethod
    def pmf(self, draft_len: int) -> np.ndarray:
        """Return P(A = k) for k = 0..draft_len, shape (draft_len + 1,)."""

    @abc.abstractmethod
    def family_params(self) -> dict:
        """Return the family's own JSON-safe parameters."""

    def params(self) -> dict:
        params = {"latency": self.latency.to_dict(), "max_draft_len": self.max_draft_len,
                  "bonus_guess_rate": self.bonus_guess_rate, "correction_guess_rate": self.correction_guess_rate}
        if self._explicit_draft_lens:
            params["draft_lens"] = list(self.draft_lens)
        if not self.predraft:  # written only when off, so configs from before the option stay equal
            params["predraft"] = False
        return {**self.family_params(), **params}

    def candidate_pmfs(self) -> dict[int, np.ndarray]:
        if self._candidates is None:
            self._candidates = {m: self.pmf(m) for m in self.draft_lens}
        return self._candidates

    def predicted_for(self, draft_len: int) -> int:
        if draft_len == 0:
            return 0
        return int(choose_predicted(self.pmf(draft_len), self.bonus_guess_rate, self.correction_guess_rate))

    def next_draft_len(self, context_len) -> np.ndarray:
        return choose_draft_len(self.candidate_pmfs(), self.latency, context_len, self.bonus_guess_rate,
                                self.correction_guess_rate, self.predraft)

    def predict(self, features: RoundFeatures) -> Prediction:
        next_len = int(self.next_draft_len(features.context_len)[0])
        return Prediction(self.predicted_for(features.draft_len), next_len)

    def update(self, accepted: int, draft_len: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def predict_batch(self, features: BatchFeatures, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        draft_len = np.asarray(features.draft_len, dtype=np.int64)
        predicted = np.zeros(len(draft_len), dtype=np.int64)
        for n in np.unique(draft_len):
            predicted[draft_len == n] = self.predicted_for(int(n))
        context = features.context_len if features.context_len is not None else np.zeros(len(draft_len))
        contexts, inverse = np.unique(np.asarray(context, dtype=float), return_inverse=True)
        next_len = self.next_draft_len(contexts)[inverse.reshape(-1)] if len(draft_len) else np.zeros(0, np.int64)
        return predicted, next_len.astype(np.int64)


class BinomialPredictor(DistributionPredictor):
    family = "binomial"

    def __init__(self, p: float, **common):
        self.p = check_rate("p", p)
        super().__init__(**common)

    def pmf(self, draft_len: int) -> np.ndarray:
        return stats.binom.pmf(np.arange(draft_len + 1), draft_len, self.p)

    def family_params(self) -> dict:
        return {"p": self.p}


class CappedGeometricPredictor(DistributionPredictor):
    family = "capped-geometric"

    def __init__(self, rate: float, **common):
        self.rate = check_rate("rate", rate)
        super().__init__(**common)

    def pmf(self, draft_len: int) -> np.ndarray:
        k = np.arange(draft_len + 1)
        pmf = self.rate ** k * (1.0 - self.rate)
        pmf[draft_len] = self.rate ** draft_len
        return pmf

    def family_params(self) -> dict:
        return {"rate": self.rate}


def _check_shape(name: str, value: float) -> float:
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


class BetaBinomialPredictor(DistributionPredictor):
    family = "beta-binomial"

    def __init__(self, alpha: float, beta: float, **common):
        self.alpha, self.beta = _check_shape("alpha", alpha), _check_shape("beta", beta)
        super().__init__(**common)

    def pmf(self, draft_len: int) -> np.ndarray:
        return stats.betabinom.pmf(np.arange(draft_len + 1), draft_len, self.alpha, self.beta)

    def family_params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}


class BetaGeometricPredictor(DistributionPredictor):
    family = "beta-geometric"

    def __init__(self, alpha: float, beta: float, **common):
        self.alpha, self.beta = _check_shape("alpha", alpha), _check_shape("beta", beta)
        super().__init__(**common)

    def pmf(self, draft_len: int) -> np.ndarray:
        return _pmf(beta_geometric_logpmf, draft_len, self.alpha, self.beta)

    def family_params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}


class EmpiricalPredictor(DistributionPredictor):
    """The observed histogram per draft_len, with ``smoothing`` added to every count.

    ``counts`` maps a draft_len (as a string, for JSON) to the counts of accepted = 0..draft_len. A
    shorter draft_len is served by truncating a longer histogram: under the prefix rule the count
    of an n-token round is min(A_L, n) for the count A_L of an L-token round with the same drafts.
    A draft_len above every recorded one extends the longest histogram's top bin geometrically
    with the pooled per-token rate.
    """

    family = "empirical"

    def __init__(self, counts: dict, smoothing: float = 0.5, **common):
        if not counts:
            raise ValueError("counts must hold at least one draft_len histogram")
        self.counts = {}
        for key, values in counts.items():
            values = np.asarray(values, dtype=float)
            if int(key) < 1 or len(values) != int(key) + 1 or (values < 0).any():
                raise ValueError(f"counts[{key!r}] must hold {int(key) + 1} non-negative counts, got {values.tolist()}")
            self.counts[int(key)] = values
        self.smoothing = float(smoothing)
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        common.setdefault("draft_lens", list(range(1, max(self.counts) + 1)))
        super().__init__(**common)

    def pooled_rate(self) -> float:
        successes = failures = 0.0
        for n, values in self.counts.items():
            successes += float((np.arange(n + 1) * values).sum())
            failures += float(values[:n].sum())
        return successes / (successes + failures) if successes + failures else 0.0

    def pmf(self, draft_len: int) -> np.ndarray:
        if draft_len == 0:
            return np.ones(1)
        longer = [n for n in self.counts if n >= draft_len]
        source = min(longer) if longer else max(self.counts)
        smoothed = self.counts[source] + self.smoothing
        full = smoothed / smoothed.sum()
        if source >= draft_len:
            pmf = full[:draft_len + 1].copy()
            pmf[draft_len] = full[draft_len:].sum()
            return pmf
        rate = self.pooled_rate()
        tail = np.r_[rate ** np.arange(draft_len - source) * (1.0 - rate), rate ** (draft_len - source)]
        return np.r_[full[:source], full[source] * tail]

    def family_params(self) -> dict:
        return {"counts": {str(n): values.tolist() for n, values in sorted(self.counts.items())},
                "smoothing": self.smoothing}
