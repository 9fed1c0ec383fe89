"""Feature predictor: a discrete-hazard GLM of acceptance on the draft's own confidences.

The target judges drafts in order and stops at the first rejection, so each judged token is a
Bernoulli trial with hazard h_i = P(token i accepted | tokens before it accepted):

    logit h_i = b0 + b1 draft_max_prob_i + b2 draft_entropy_i + b3 depth_i,

where depth_i is the token's 0-based index within its round. Fitting uses one row per drafted
token up to and including the first rejection; tokens after it were never judged and carry no
information. The product of these Bernoulli likelihoods is exactly the likelihood of the
accepted counts, so the GLM's log-likelihood compares directly with the distribution fits'.

The round's pmf follows from the hazards, P(k) = h_0 ... h_{k-1} (1 - h_k) for k < n and
P(n) = h_0 ... h_{n-1}; the predicted count and the next draft_len come from the speed objective
as in ``bpsim.predictors.distribution``. The next round's confidences are unknown when its length
is chosen, so that choice uses the hazards at the training means of the confidences.
"""

from __future__ import annotations

import numpy as np

from bpsim.predictors.base import BatchFeatures, Prediction, RoundFeatures
from bpsim.predictors.distribution import DistributionPredictor
from bpsim.predictors.objective import choose_predicted

FEATURES = ("draft_max_prob", "draft_entropy", "depth")


def judged_token_rows(draft_len, accepted, max_prob, entropy) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(exog, endog)``: one row per judged drafted token with a constant column first.

    ``max_prob`` and ``entropy`` are (rounds, width) with width >= max draft_len. A token is judged
    when its index is at most ``accepted`` and below ``draft_len``; ``endog`` is 1 if it was accepted.
    """
    draft_len, accepted = np.asarray(draft_len), np.asarray(accepted)
    max_prob, entropy = np.asarray(max_prob, dtype=float), np.asarray(entropy, dtype=float)
    depth = np.broadcast_to(np.arange(max_prob.shape[1]), max_prob.shape)
    judged = (depth <= accepted[:, None]) & (depth < draft_len[:, None])  # (rounds, width)
    exog = np.column_stack([np.ones(judged.sum()), max_prob[judged], entropy[judged], depth[judged]])
    endog = (depth < accepted[:, None])[judged].astype(float)
    return exog, endog


def hazard_pmf(hazard: np.ndarray, draft_len: np.ndarray) -> np.ndarray:
    """Return the accepted-count pmf of each round, (rounds, width + 1), zero past draft_len.

    ``hazard`` is (rounds, width); entries at or past a round's draft_len are ignored.
    """
    rounds, width = hazard.shape
    depth = np.arange(width)
    hazard = np.where(depth[None, :] < draft_len[:, None], hazard, 0.0)  # a padded token stops the run
    survive = np.concatenate([np.ones((rounds, 1)), np.cumprod(hazard, axis=1)], axis=1)  # (rounds, width + 1)
    stop = np.concatenate([1.0 - hazard, np.ones((rounds, 1))], axis=1)
    return survive * stop


class HazardGLMPredictor(DistributionPredictor):
    """Per-round pmf from the hazard GLM; ``coefficients`` are b0..b3 in the order of the module formula.

    ``mean_features`` are the training means of draft_max_prob and draft_entropy, used for rounds
    without recorded confidences and for choosing the next draft_len.
    """

    family = "hazard-glm"

    def __init__(self, coefficients, mean_features, **common):
        coefficients = [float(c) for c in coefficients]
        mean_features = [float(v) for v in mean_features]
        if len(coefficients) != len(FEATURES) + 1 or not np.all(np.isfinite(coefficients)):
            raise ValueError(f"coefficients must be {len(FEATURES) + 1} finite numbers, got {coefficients}")
        if len(mean_features) != 2:
            raise ValueError(f"mean_features must be [draft_max_prob, draft_entropy], got {mean_features}")
        self.coefficients, self.mean_features = coefficients, mean_features
        super().__init__(**common)

    def hazard(self, max_prob: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        """Return h for (rounds, width) confidences; NaN confidences take the training means."""
        max_prob = np.where(np.isnan(max_prob), self.mean_features[0], max_prob)
        entropy = np.where(np.isnan(entropy), self.mean_features[1], entropy)
        depth = np.arange(max_prob.shape[1])[None, :]
        b0, b1, b2, b3 = self.coefficients
        return 1.0 / (1.0 + np.exp(-(b0 + b1 * max_prob + b2 * entropy + b3 * depth)))

    def pmf(self, draft_len: int) -> np.ndarray:
        if draft_len == 0:
            return np.ones(1)
        mean = np.full((1, draft_len), np.nan)
        return hazard_pmf(self.hazard(mean, mean), np.array([draft_len]))[0]

    def round_pmf(self, features: RoundFeatures) -> np.ndarray:
        n = features.draft_len
        max_prob = np.array([features.draft_max_prob or [np.nan] * n], dtype=float).reshape(1, n)
        entropy = np.array([features.draft_entropy or [np.nan] * n], dtype=float).reshape(1, n)
        return hazard_pmf(self.hazard(max_prob, entropy), np.array([n]))[0]

    def predict(self, features: RoundFeatures) -> Prediction:
        next_len = int(self.next_draft_len(features.context_len)[0])
        if features.draft_len == 0:
            return Prediction(0, next_len)
        pmf = self.round_pmf(features)
        return Prediction(int(choose_predicted(pmf, self.bonus_guess_rate, self.correction_guess_rate)), next_len)

    def predict_batch(self, features: BatchFeatures, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, next_len = super().predict_batch(features, accepted)
        draft_len = np.asarray(features.draft_len, dtype=np.int64)
        width = max(int(draft_len.max(initial=0)), 1)
        max_prob = _padded(features.draft_max_prob, len(draft_len), width)
        entropy = _padded(features.draft_entropy, len(draft_len), width)
        pmf = hazard_pmf(self.hazard(max_prob, entropy), draft_len)  # (rounds, width + 1)
        predicted = np.zeros(len(draft_len), dtype=np.int64)
        for n in np.unique(draft_len):
            rows = draft_len == n
            if n > 0:
                predicted[rows] = choose_predicted(pmf[rows, :n + 1], self.bonus_guess_rate, self.correction_guess_rate)
        return predicted, next_len

    def family_params(self) -> dict:
        return {"coefficients": self.coefficients, "mean_features": self.mean_features}

    @classmethod
    def fit(cls, draft_len, accepted, max_prob, entropy, **common):
        """Fit the GLM by maximum likelihood (statsmodels, binomial family, logit link).

        Returns ``(predictor, results)`` with the statsmodels GLMResults.
        """
        import statsmodels.api as sm

        exog, endog = judged_token_rows(draft_len, accepted, max_prob, entropy)
        if len(endog) == 0:
            raise ValueError("no judged drafted token to fit the hazard GLM on (every round has draft_len 0)")
        results = sm.GLM(endog, exog, family=sm.families.Binomial()).fit()
        mean_features = [float(exog[:, 1].mean()), float(exog[:, 2].mean())]
        return cls(coefficients=results.params.tolist(), mean_features=mean_features, **common), results


def _padded(matrix, rounds: int, width: int) -> np.ndarray:
    if matrix is None:
        return np.full((rounds, width), np.nan)
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape[1] >= width:
        return matrix[:, :width]
    return np.concatenate([matrix, np.full((rounds, width - matrix.shape[1]), np.nan)], axis=1)
