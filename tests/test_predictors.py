import json

import numpy as np
import pytest
from scipy import stats

from bpsim.latency import LatencyModel
from bpsim.predictors import BatchFeatures, Predictor, PredictorConfigError, RoundFeatures, predictor_from_config
from bpsim.predictors.distribution import (BetaBinomialPredictor, BetaGeometricPredictor, BinomialPredictor,
                                           CappedGeometricPredictor, EmpiricalPredictor)
from bpsim.predictors.features import HazardGLMPredictor, hazard_pmf, judged_token_rows
from bpsim.predictors.history import (ExpAveragePredictor, LastValuePredictor, OneBitPredictor,
                                      PlusTwoMinusOnePredictor, SaturatingCounterPredictor, TwoLevelPredictor)
from bpsim.predictors.objective import choose_draft_len, choose_predicted
from bpsim.predictors.static import StaticPredictor

LATENCY = LatencyModel(draft_ms_per_token=2.0, verify_base_ms=10.0, verify_ms_per_token=0.5,
                       verify_ms_per_context=0.01)


def recorded_rounds(seed=0, requests=5, rounds=20, width=6):
    rng = np.random.default_rng(seed)
    total = requests * rounds
    draft_len = rng.choice([0, 2, 4, 6], size=total)
    accepted = np.minimum(rng.geometric(0.35, size=total) - 1, draft_len)
    max_prob = rng.uniform(0.2, 1.0, size=(total, width))
    entropy = rng.uniform(0.0, 3.0, size=(total, width))
    padding = np.arange(width)[None, :] >= draft_len[:, None]
    max_prob[padding] = np.nan
    entropy[padding] = np.nan
    features = BatchFeatures(np.repeat(np.arange(requests), rounds), draft_len, max_prob, entropy,
                             np.tile(np.arange(rounds) * 3, requests),
                             context_len=np.tile(20 + np.arange(rounds) * 3, requests))
    return features, accepted


def every_predictor():
    common = {"latency": LATENCY, "max_draft_len": 6, "bonus_guess_rate": 0.7, "correction_guess_rate": 0.3}
    features, accepted = recorded_rounds()
    glm, _ = HazardGLMPredictor.fit(features.draft_len, accepted, features.draft_max_prob, features.draft_entropy,
                                    **common)
    return [
        StaticPredictor("all", draft_len=4), StaticPredictor("fixed", k=2, draft_len=3), StaticPredictor("zero"),
        BinomialPredictor(0.6, **common), CappedGeometricPredictor(0.6, **common),
        BetaBinomialPredictor(2.0, 1.5, **common), BetaGeometricPredictor(4.0, 2.0, **common),
        EmpiricalPredictor({"4": [5, 3, 2, 1, 4], "2": [1, 1, 3]}, **common),
        LastValuePredictor(), PlusTwoMinusOnePredictor(draft_len=3, max_draft_len=7),
        ExpAveragePredictor(alpha=0.3, initial=1.5, length_rule="follow"),
        SaturatingCounterPredictor(bits=3, length_rule="plus2-minus1"),
        TwoLevelPredictor.fit(features.request_id, features.draft_len, accepted, history=2, max_symbol=6),
        OneBitPredictor(high_draft_len=5, low_draft_len=0), glm,
    ]


@pytest.mark.parametrize("predictor", every_predictor(), ids=lambda p: p.family)
def test_config_round_trip(predictor):
    config = json.loads(json.dumps(predictor.to_config()))
    rebuilt = predictor_from_config(config)
    assert type(rebuilt) is type(predictor)
    assert rebuilt.to_config() == predictor.to_config()


@pytest.mark.parametrize("predictor", every_predictor(), ids=lambda p: p.family)
def test_predict_batch_matches_scalar(predictor):
    features, accepted = recorded_rounds(seed=1)
    batch = predictor.predict_batch(features, accepted)
    rebuilt = predictor_from_config(predictor.to_config())
    scalar = Predictor.predict_batch(rebuilt, features, accepted)
    np.testing.assert_array_equal(batch[0], scalar[0])
    np.testing.assert_array_equal(batch[1], scalar[1])
    assert (batch[0] >= 0).all()
    assert (batch[0] <= features.draft_len).all()
    assert (batch[1] >= 0).all()


def test_static_choices():
    round_features = RoundFeatures(draft_len=5)
    assert StaticPredictor("all", draft_len=3).predict(round_features).predicted == 5
    assert StaticPredictor("fixed", k=2).predict(round_features).predicted == 2
    assert StaticPredictor("fixed", k=9).predict(round_features).predicted == 5
    assert StaticPredictor("zero").predict(round_features).predicted == 0
    assert StaticPredictor("all", draft_len=3).predict(round_features).next_draft_len == 3


def test_capped_geometric_is_censored_not_renormalised():
    pmf = CappedGeometricPredictor(0.6, latency=LATENCY).pmf(4)
    expected = [0.4, 0.24, 0.144, 0.0864, 0.6 ** 4]
    np.testing.assert_allclose(pmf, expected, rtol=1e-12)
    assert pmf.sum() == pytest.approx(1.0)
    renormalised = stats.geom.pmf(np.arange(1, 6), 0.4)
    renormalised /= renormalised.sum()
    assert not np.allclose(pmf, renormalised, atol=1e-3)


def test_beta_geometric_approaches_capped_geometric():
    # With huge alpha + beta the per-round rate is almost constant.
    mixture = BetaGeometricPredictor(6e5, 4e5, latency=LATENCY).pmf(5)
    np.testing.assert_allclose(mixture, CappedGeometricPredictor(0.6, latency=LATENCY).pmf(5), atol=1e-5)
    assert BetaBinomialPredictor(2.0, 3.0, latency=LATENCY).pmf(6).sum() == pytest.approx(1.0)


def test_predicted_weighs_branch_guesses():
    pmf = np.array([0.35, 0.1, 0.25, 0.3])
    assert choose_predicted(pmf, 1.0, 1.0) == 0  # equal guess rates: the mode
    assert choose_predicted(pmf, 0.8, 0.3) == 3  # 0.3 * 0.8 > 0.35 * 0.3
    assert choose_predicted(pmf, 0.1, 0.9) == 0


def test_draft_len_follows_acceptance():
    never = {m: CappedGeometricPredictor(0.0, latency=LATENCY).pmf(m) for m in range(1, 7)}
    always = {m: CappedGeometricPredictor(0.999, latency=LATENCY).pmf(m) for m in range(1, 7)}
    assert choose_draft_len(never, LATENCY, [0], 1.0, 1.0)[0] == 0  # speculation loses: plain decoding
    assert choose_draft_len(always, LATENCY, [0], 1.0, 1.0)[0] == 6


def test_distribution_predictor_respects_candidates():
    predictor = CappedGeometricPredictor(0.95, latency=LATENCY, draft_lens=[2, 3])
    assert predictor.predict(RoundFeatures(draft_len=3)).next_draft_len in (0, 2, 3)
    assert predictor_from_config(predictor.to_config()).draft_lens == [2, 3]


def test_empirical_truncates_longer_histogram():
    predictor = EmpiricalPredictor({"4": [4, 3, 2, 1, 10]}, smoothing=0.0, latency=LATENCY)
    np.testing.assert_allclose(predictor.pmf(4), np.array([4, 3, 2, 1, 10]) / 20)
    np.testing.assert_allclose(predictor.pmf(2), np.array([4, 3, 13]) / 20)
    assert predictor.pmf(6).sum() == pytest.approx(1.0)
    np.testing.assert_allclose(predictor.pmf(6)[:4], np.array([4, 3, 2, 1]) / 20)


def test_plus_two_minus_one_rule():
    predictor = PlusTwoMinusOnePredictor(draft_len=3, max_draft_len=10)
    first = predictor.predict(RoundFeatures(draft_len=3))
    assert first.predicted == 3  # no history: all accepted
    assert first.next_draft_len == 5
    predictor.update(1, 3)
    second = predictor.predict(RoundFeatures(draft_len=3))
    assert second.predicted == 1
    assert second.next_draft_len == 2
    predictor.update(0, 1)
    assert predictor.predict(RoundFeatures(draft_len=1)).next_draft_len == 1  # never below 1


def test_one_bit_switches():
    predictor = OneBitPredictor(high_draft_len=6, low_draft_len=1)
    assert predictor.predict(RoundFeatures(draft_len=4)).predicted == 4
    predictor.update(2, 4)
    low = predictor.predict(RoundFeatures(draft_len=6))
    assert low.predicted == 0
    assert low.next_draft_len == 1
    predictor.update(1, 1)
    assert predictor.predict(RoundFeatures(draft_len=1)).next_draft_len == 6


def test_saturating_counter_hysteresis():
    predictor = SaturatingCounterPredictor(bits=2, draft_len=4)
    predictor.update(4, 4)  # counter 3
    predictor.update(1, 4)  # counter 2, still "all accepted"
    assert predictor.predict(RoundFeatures(draft_len=4)).predicted == 4
    predictor.update(2, 4)  # counter 1
    assert predictor.predict(RoundFeatures(draft_len=4)).predicted == 2


def test_exp_average_values():
    predictor = ExpAveragePredictor(alpha=0.5, initial=4.0)
    assert predictor.predict(RoundFeatures(draft_len=6)).predicted == 4
    predictor.update(0, 6)  # mean 2
    predictor.update(0, 6)  # mean 1
    assert predictor.predict(RoundFeatures(draft_len=6)).predicted == 1
    predictor.reset()
    assert predictor.predict(RoundFeatures(draft_len=6)).predicted == 4


def test_two_level_learns_alternation():
    request = np.zeros(40, dtype=int)
    draft_len = np.full(40, 4)
    accepted = np.tile([0, 4], 20)
    predictor = TwoLevelPredictor.fit(request, draft_len, accepted, history=2, max_symbol=4)
    predicted, _ = predictor.predict_batch(BatchFeatures(request, draft_len), accepted)
    assert (predicted[2:] == accepted[2:]).all()
    assert LastValuePredictor().predict_batch(BatchFeatures(request, draft_len), accepted)[0][1:].tolist() \
        == accepted[:-1].tolist()


def test_history_resets_per_request():
    request = np.array([0, 0, 1, 1])
    draft_len = np.full(4, 4)
    accepted = np.array([1, 2, 3, 0])
    predicted, _ = LastValuePredictor().predict_batch(BatchFeatures(request, draft_len), accepted)
    assert predicted.tolist() == [4, 1, 4, 3]


def test_glm_rows_are_judged_tokens_only():
    draft_len = np.array([4, 4, 3, 0])
    accepted = np.array([1, 4, 0, 0])
    max_prob = np.arange(16, dtype=float).reshape(4, 4) / 16
    entropy = np.ones((4, 4))
    exog, endog = judged_token_rows(draft_len, accepted, max_prob, entropy)
    # Round 0: tokens 0 (accepted) and 1 (the rejection); round 1: all 4; round 2: token 0 only.
    assert endog.tolist() == [1, 0, 1, 1, 1, 1, 0]
    assert exog[:, 3].tolist() == [0, 1, 0, 1, 2, 3, 0]
    assert exog[:, 1].tolist() == pytest.approx([0, 1 / 16, 4 / 16, 5 / 16, 6 / 16, 7 / 16, 8 / 16])


def test_glm_ignores_unjudged_confidences():
    features, accepted = recorded_rounds(seed=2, requests=10)
    unjudged = np.arange(features.draft_max_prob.shape[1])[None, :] > accepted[:, None]
    scrambled = features.draft_max_prob.copy()
    scrambled[unjudged & ~np.isnan(scrambled)] = 0.01
    first, _ = HazardGLMPredictor.fit(features.draft_len, accepted, features.draft_max_prob,
                                      features.draft_entropy, latency=LATENCY)
    second, _ = HazardGLMPredictor.fit(features.draft_len, accepted, scrambled, features.draft_entropy,
                                       latency=LATENCY)
    assert first.coefficients == second.coefficients


def test_hazard_pmf_matches_product_form():
    hazard = np.array([[0.9, 0.5, 0.2]])
    pmf = hazard_pmf(hazard, np.array([3]))[0]
    np.testing.assert_allclose(pmf, [0.1, 0.9 * 0.5, 0.9 * 0.5 * 0.8, 0.9 * 0.5 * 0.2])
    short = hazard_pmf(hazard, np.array([2]))[0]
    np.testing.assert_allclose(short, [0.1, 0.45, 0.45, 0.0])


@pytest.mark.parametrize("config, message", [
    ({"version": 1, "family": "nope", "params": {}}, "unknown predictor family"),
    ({"version": 1, "family": "static", "params": {"choice": "some"}}, "choice"),
    ({"version": 1, "family": "capped-geometric", "params": {"rate": 1.5, "latency": LATENCY.to_dict()}}, "rate"),
    ({"version": 1, "family": "exp-average", "params": {"alpha": 0}}, "alpha"),
    ({"version": 1, "family": "empirical", "params": {"counts": {"2": [1, 2]}, "latency": LATENCY.to_dict()}},
     "counts"),
    ({"version": 1, "family": "binomial", "params": {"latency": LATENCY.to_dict()}},
     r"'binomial' is missing parameter p .*re-export it with bpsim export"),
])
def test_invalid_config_rejected(config, message):
    with pytest.raises(PredictorConfigError, match=message):
        predictor_from_config(config)
