"""Score predictors on recorded rounds: hit rate, mean absolute error and expected speed.

Every predictor replays the recorded rounds of each request in order through ``predict_batch``,
fed the recorded verdicts, and is scored on:

- ``hit_rate``: the share of rounds with predicted == accepted (the branch point alone);
- ``mae``: the mean of |predicted - accepted|;
- ``speed``: expected tokens per ms under the latency model when the predictor also chooses
  each round's draft_len (see ``expected_round_stats``);
- ``speed_recorded_len``: the same with the recorded draft lengths, which isolates the payoff of
  the branch prediction.

Rounds of one request are correlated, so the intervals come from a bootstrap over whole requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bpsim.fitting import Rounds
from bpsim.jsonsafe import json_safe
from bpsim.latency import LatencyModel
from bpsim.predictors.base import Predictor
from bpsim.predictors.history import request_starts

METRICS = ("hit_rate", "mae", "speed", "speed_recorded_len")


@dataclass(frozen=True)
class ScoreSettings:
    """The assumptions of expected speed beyond the latency model."""

    latency: LatencyModel
    bonus_guess_rate: float  # probability the draft's own next token equals the target's bonus token
    correction_guess_rate: float  # used where a round's second_match is unknown
    per_token_rate: float  # fills in acceptances past a recorded draft_len (see expected_round_stats)


def capped_geometric(rate: float, draft_len: np.ndarray) -> np.ndarray:
    """Return the capped-geometric pmf of each entry, (entries, max draft_len + 1), zero past it."""
    draft_len = np.asarray(draft_len, dtype=np.int64)
    width = int(draft_len.max(initial=0))
    k = np.arange(width + 1)[None, :]
    pmf = np.where(k < draft_len[:, None], rate ** k * (1.0 - rate), 0.0)
    pmf[np.arange(len(draft_len)), draft_len] = rate ** draft_len
    return pmf


def expected_round_stats(rounds: Rounds, predicted: np.ndarray, used_len: np.ndarray, settings: ScoreSettings
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return expected ``(tokens, kept, accepted)`` of each round drafted with ``used_len`` tokens.

    A round recorded with draft_len n and accepted a, redrafted with u tokens, accepts exactly
    min(a, u) when u <= n or a < n, because the target judges the same drafts in the same order.
    When u > n and a == n the trace does not say how the extra drafts fare, so they follow the
    capped geometric with ``per_token_rate`` (an estimate). ``kept`` is the probability that the
    round's prediction, capped at u, matches and its branch token is guessed. At a real rejection
    the guess is the recorded second-best match. Inside the recorded drafts it is 1 or 0, because
    the draft's next token there is known to be accepted or rejected. Past them it is
    ``bonus_guess_rate``.
    """
    n, a = rounds.draft_len, rounds.accepted
    u = np.asarray(used_len, dtype=np.int64)
    j = np.minimum(np.asarray(predicted, dtype=np.int64), u)
    exact = (u <= n) | (a < n)
    accepted = np.where(exact, np.minimum(a, u), 0).astype(float)
    correction = np.where(np.isnan(rounds.second_match), settings.correction_guess_rate, rounds.second_match)

    # Exact rounds: the realised count is known and so is the guess, except the bonus past n.
    real = np.minimum(a, u)
    guess = np.where(real < u, correction, np.where(u < n, (a > u).astype(float), settings.bonus_guess_rate))
    kept = np.where(exact, (j == real) * guess, 0.0)

    # Censored rounds: a == n < u, extra acceptances X over the u - n further drafts.
    censored = np.flatnonzero(~exact)
    if len(censored):
        extra_len = u[censored] - n[censored]
        pmf = capped_geometric(settings.per_token_rate, extra_len)  # (censored, max extra + 1)
        accepted[censored] = n[censored] + (pmf * np.arange(pmf.shape[1])).sum(axis=1)
        offset = j[censored] - n[censored]
        inside = offset >= 0
        prob = np.where(inside, pmf[np.arange(len(censored)), np.clip(offset, 0, pmf.shape[1] - 1)], 0.0)
        branch_guess = np.where(offset == extra_len, settings.bonus_guess_rate, settings.correction_guess_rate)
        kept[censored] = prob * branch_guess
    return accepted + 1.0, kept, accepted


def expected_round_ms(rounds: Rounds, used_len: np.ndarray, kept: np.ndarray, latency: LatencyModel) -> np.ndarray:
    """Return the modelled wall time of each round.

    Each round costs its verification and, unless a kept pre-draft from the previous round made
    its drafts (probability ``kept`` of that round), its drafting. A round that pre-drafts the
    next round of its request pays ``predraft_cost_ms`` of that pre-draft, kept or not.
    """
    u = np.asarray(used_len, dtype=np.int64)
    starts = request_starts(rounds.request)
    verify = latency.verify_ms(u + 1, rounds.context_len)
    draft = latency.draft_ms(u)
    previous_kept = np.where(starts, 0.0, np.r_[0.0, kept[:-1]] if len(u) else kept)
    ends = np.r_[starts[1:], True] if len(u) else starts
    next_used = np.where(ends, 0, np.r_[u[1:], 0] if len(u) else u)
    predraft = latency.predraft_cost_ms(next_used, verify)
    return verify + draft * (1.0 - previous_kept) + predraft


@dataclass
class PredictorScore:
    """Scores of one predictor on a set of rounds, with bootstrap intervals over requests."""

    name: str
    config: dict
    hit_rate: float
    mae: float
    speed: float  # expected tokens per ms with the predictor's own draft lengths
    speed_recorded_len: float  # expected tokens per ms with the recorded draft lengths
    mean_next_draft_len: float
    intervals: dict = field(default_factory=dict)  # metric -> [low, high]
    per_request: np.ndarray | None = None  # (requests, 7) sums behind the metrics, for strata and bootstrap

    def summary(self) -> dict:
        return json_safe({"name": self.name, "config": self.config, "hit_rate": self.hit_rate, "mae": self.mae,
                              "speed": self.speed, "speed_recorded_len": self.speed_recorded_len,
                              "mean_next_draft_len": self.mean_next_draft_len,
                              "intervals": {key: list(value) for key, value in self.intervals.items()}})


def per_round_sums(rounds: Rounds, predicted: np.ndarray, next_len: np.ndarray, settings: ScoreSettings) -> np.ndarray:
    """Return the (rounds, 7) columns: hit, |error|, 1, tokens, ms, tokens and ms at the recorded lengths."""
    starts = request_starts(rounds.request)
    own_len = np.where(starts, rounds.draft_len, np.r_[0, next_len[:-1]] if len(next_len) else next_len)
    tokens, kept, _ = expected_round_stats(rounds, predicted, own_len, settings)
    ms = expected_round_ms(rounds, own_len, kept, settings.latency)
    recorded_tokens, recorded_kept, _ = expected_round_stats(rounds, predicted, rounds.draft_len, settings)
    recorded_ms = expected_round_ms(rounds, rounds.draft_len, recorded_kept, settings.latency)
    hit = (predicted == rounds.accepted).astype(float)
    error = np.abs(predicted - rounds.accepted).astype(float)
    return np.column_stack([hit, error, np.ones(len(rounds)), tokens, ms, recorded_tokens, recorded_ms])


def metrics_from_sums(sums: np.ndarray) -> np.ndarray:
    """Turn summed columns (..., 7) into (..., 4) metrics in the order of ``METRICS``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([sums[..., 0] / sums[..., 2], sums[..., 1] / sums[..., 2], sums[..., 3] / sums[..., 4],
                         sums[..., 5] / sums[..., 6]], axis=-1)


def bootstrap_intervals(per_request: np.ndarray, resamples: int = 200, seed: int = 0, level: float = 0.95
                        ) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each metric from resampling whole requests with replacement."""
    requests = len(per_request)
    if requests < 2 or resamples < 1:
        return {}
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(requests, np.full(requests, 1.0 / requests), size=resamples)  # (resamples, requests)
    metrics = metrics_from_sums(weights @ per_request)  # (resamples, 4)
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(metrics, [tail, 100 - tail], axis=0)
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(METRICS, low, high)}


def request_sums(rounds: Rounds, per_round: np.ndarray) -> np.ndarray:
    """Sum per-round columns within each request, (requests, columns), requests in order of appearance."""
    _, index = np.unique(rounds.request, return_inverse=True)
    sums = np.zeros((index.max(initial=-1) + 1, per_round.shape[1]))
    np.add.at(sums, index.reshape(-1), per_round)
    return sums


def score_predictor(name: str, predictor: Predictor, rounds: Rounds, settings: ScoreSettings,
                    resamples: int = 200, seed: int = 0) -> PredictorScore:
    """Replay ``rounds`` through ``predictor`` and score it, with bootstrap intervals over requests."""
    predicted, next_len = predictor.predict_batch(rounds.batch_features(), rounds.accepted)
    predicted, next_len = np.asarray(predicted, dtype=np.int64), np.asarray(next_len, dtype=np.int64)
    per_round = per_round_sums(rounds, predicted, next_len, settings)
    per_request = request_sums(rounds, per_round)
    hit_rate, mae, speed, speed_recorded = metrics_from_sums(per_round.sum(axis=0))
    return PredictorScore(name, predictor.to_config(), float(hit_rate), float(mae), float(speed), float(speed_recorded),
                          float(np.mean(next_len)) if len(next_len) else float("nan"),
                          bootstrap_intervals(per_request, resamples, seed), per_request)


def reference_speeds(rounds: Rounds, latency: LatencyModel) -> dict[str, float]:
    """Tokens per ms of target-only decoding and of plain speculative decoding at the recorded draft lengths."""
    tokens = float((rounds.accepted + 1).sum())
    plain_ms = float(latency.round_ms(rounds.draft_len, rounds.context_len).sum())
    target_ms = float(latency.verify_ms(1, rounds.context_len).mean())
    return {"target_only": 1.0 / target_ms, "speculative_recorded_len": tokens / plain_ms}


# ---------------------------------------------------------------------------------------------
# Fitting and scoring every family


@dataclass
class Evaluation:
    """Fits on the train split and scores on the test split of one set of rounds."""

    label: str
    held_out: bool  # false when train and test are the same rounds (a single request)
    train_rounds: int
    test_rounds: int
    test_requests: int
    settings: ScoreSettings
    fits: dict  # family -> FitResults on train
    heldout: dict  # family -> {"loglike", "per_round", "interval"} on test
    scores: list  # PredictorScore, best speed first
    references: dict

    @property
    def winner(self) -> PredictorScore:
        return self.scores[0]

    def summary(self) -> dict:
        return json_safe({
            "label": self.label, "held_out": self.held_out, "train_rounds": self.train_rounds,
            "test_rounds": self.test_rounds, "test_requests": self.test_requests,
            "latency": self.settings.latency.to_dict(), "bonus_guess_rate": self.settings.bonus_guess_rate,
            "correction_guess_rate": self.settings.correction_guess_rate,
            "per_token_rate": self.settings.per_token_rate,
            "winner": self.winner.name, "winner_config": self.winner.config,
            "fits": {family: {**fit.summary(), "heldout": self.heldout.get(family)} for family, fit in self.fits.items()},
            "predictors": [score.summary() for score in self.scores],
            "references": self.references,
        })


def candidate_predictors(train: Rounds, fits: dict, settings: ScoreSettings) -> dict[str, Predictor]:
    """Build one predictor of every family, with parameters fitted or chosen on ``train``."""
    from bpsim.predictors.history import (ExpAveragePredictor, LastValuePredictor, OneBitPredictor,
                                          PlusTwoMinusOnePredictor, SaturatingCounterPredictor, TwoLevelPredictor)
    from bpsim.predictors.static import StaticPredictor

    drafted = train.draft_len[train.draft_len > 0]
    lengths, counts = np.unique(drafted, return_counts=True)
    modal_len = int(lengths[np.argmax(counts)]) if len(lengths) else 1
    max_len = int(lengths.max()) if len(lengths) else 1
    history = {"draft_len": modal_len, "max_draft_len": max_len}

    # The fixed guess k is chosen on train by expected speed at the recorded draft lengths.
    best_k, best_speed = 0, -np.inf
    for k in range(max_len + 1):
        sums = per_round_sums(train, np.minimum(k, train.draft_len), train.draft_len, settings).sum(axis=0)
        speed = metrics_from_sums(sums)[3]
        if speed > best_speed:
            best_k, best_speed = k, speed

    predictors: dict[str, Predictor] = {
        "static-all": StaticPredictor("all", draft_len=modal_len),
        "static-fixed": StaticPredictor("fixed", k=best_k, draft_len=modal_len),
        "static-zero": StaticPredictor("zero", draft_len=modal_len),
    }
    for family, fit in fits.items():
        predictors[family] = fit.predictor
    mean_accepted = float(drafted.size and train.accepted[train.draft_len > 0].mean())
    predictors.update({
        "last-value": LastValuePredictor(**history),
        "exp-average": ExpAveragePredictor(alpha=0.5, initial=mean_accepted, **history),
        "saturating-counter": SaturatingCounterPredictor(bits=2, **history),
        "two-level": TwoLevelPredictor.fit(train.request, train.draft_len, train.accepted, history=2,
                                           max_symbol=max_len, **history),
        "one-bit": OneBitPredictor(high_draft_len=max_len, low_draft_len=1),
        "plus2-minus1": PlusTwoMinusOnePredictor(**history),
    })
    return predictors


def _heldout(fit, test: Rounds, resamples: int, seed: int) -> dict:
    from bpsim.fitting import round_loglike

    drafted = test.subset(test.draft_len > 0)
    loglike = round_loglike(fit.predictor, drafted)
    result = {"loglike": float(loglike.sum()), "per_round": float(loglike.mean()) if len(loglike) else float("nan"),
              "interval": None}
    if len(loglike) and resamples > 0:
        sums = request_sums(drafted, np.column_stack([loglike, np.ones(len(loglike))]))
        if len(sums) >= 2 and np.isfinite(sums).all():
            rng = np.random.default_rng(seed)
            weights = rng.multinomial(len(sums), np.full(len(sums), 1.0 / len(sums)), size=resamples)
            resampled = weights @ sums
            per_round = resampled[:, 0] / resampled[:, 1]
            result["interval"] = [float(np.percentile(per_round, 2.5)), float(np.percentile(per_round, 97.5))]
    return result


def evaluate(train: Rounds, test: Rounds, held_out: bool = True, label: str = "all", resamples: int = 200,
             seed: int = 0, families=None, latency: LatencyModel | None = None) -> Evaluation:
    """Fit the latency model, every distribution family and every predictor on ``train``; score on ``test``.

    A ``latency`` model fitted elsewhere (for example with target-only traces added) replaces the
    one fitted on ``train``.
    """
    from bpsim.fitting import DISTRIBUTION_FAMILIES, FitError, fit_distribution, has_confidences

    latency = latency or train.latency_model()
    bonus, correction = train.guess_rates()
    settings = ScoreSettings(latency, bonus, correction, train.per_token_rate())
    drafted = train.draft_len[train.draft_len > 0]
    options = {"max_draft_len": int(drafted.max(initial=1)), "bonus_guess_rate": bonus,
               "correction_guess_rate": correction}
    families = list(families or DISTRIBUTION_FAMILIES + ("hazard-glm",))
    if "hazard-glm" in families and not has_confidences(train):
        families.remove("hazard-glm")
    fits = {}
    for family in families:
        try:
            fits[family] = fit_distribution(family, train, latency, **options)
        except FitError:
            if family != "hazard-glm":
                raise
    heldout = {family: _heldout(fit, test, resamples, seed) for family, fit in fits.items()}
    predictors = candidate_predictors(train, fits, settings)
    scores = [score_predictor(name, predictor, test, settings, resamples, seed) for name, predictor in predictors.items()]
    scores.sort(key=lambda score: -score.speed)
    return Evaluation(label, held_out, len(train), len(test), len(test.requests), settings, fits, heldout, scores,
                      reference_speeds(test, latency))
