import numpy as np
import pytest
from scipy import optimize, special, stats

from bpsim.fitting import (FitError, Rounds, capped_geometric_mle, chi_square, fit_distribution, pool_bins,
                           split_by_request)
from bpsim.latency import LatencyModel
from bpsim.scoring import (ScoreSettings, bootstrap_intervals, evaluate, expected_round_ms, expected_round_stats,
                           score_predictor)
from bpsim.predictors.static import StaticPredictor
from bpsim.synthetic import synthetic_trace

LATENCY = LatencyModel(draft_ms_per_token=2.0, verify_base_ms=10.0, verify_ms_per_token=0.5)


def rounds_of(**spec):
    return Rounds.from_tables([("synthetic", synthetic_trace(**spec))])


def test_binomial_mle_matches_optimizer():
    rounds = rounds_of(requests=20, rounds_per_request=30, draft_len=(2, 5), acceptance=0.6, seed=1)
    fit = fit_distribution("binomial", rounds, LATENCY)
    k, n = rounds.accepted, rounds.draft_len

    def negative_loglike(p):
        return -np.sum(special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
                       + k * np.log(p) + (n - k) * np.log1p(-p))

    reference = optimize.minimize_scalar(negative_loglike, bounds=(1e-6, 1 - 1e-6), method="bounded",
                                         options={"xatol": 1e-10})
    assert fit.fitted_params["p"] == pytest.approx(k.sum() / n.sum(), rel=1e-12)  # closed form
    assert fit.fitted_params["p"] == pytest.approx(reference.x, abs=1e-6)  # optimizer tolerance
    assert fit.loglike == pytest.approx(-reference.fun, rel=1e-9)


def test_capped_geometric_mle_matches_optimizer():
    rounds = rounds_of(requests=20, rounds_per_request=30, draft_len=(3, 6), acceptance=0.7, seed=2)
    fit = fit_distribution("capped-geometric", rounds, LATENCY)
    k, n = rounds.accepted, rounds.draft_len

    # Written out: a^k (1 - a) for k < n and a^n at k = n.
    def negative_loglike(a):
        return -np.sum(k * np.log(a) + (k < n) * np.log1p(-a))

    reference = optimize.minimize_scalar(negative_loglike, bounds=(1e-6, 1 - 1e-6), method="bounded",
                                         options={"xatol": 1e-10})
    successes, failures = k.sum(), (k < n).sum()
    assert fit.fitted_params["rate"] == pytest.approx(successes / (successes + failures), rel=1e-12)
    assert fit.fitted_params["rate"] == pytest.approx(reference.x, abs=1e-6)
    assert fit.loglike == pytest.approx(-reference.fun, rel=1e-9)
    assert fit.fitted_params["rate"] == pytest.approx(0.7, abs=0.03)  # 900 rounds, standard error about 0.01


def test_beta_fits_match_scipy_loglike():
    rounds = rounds_of(requests=30, rounds_per_request=40, draft_len=(4,), round_concentration=4.0, seed=3)
    binomial = fit_distribution("beta-binomial", rounds, LATENCY)
    alpha, beta = binomial.fitted_params["alpha"], binomial.fitted_params["beta"]
    assert binomial.loglike == pytest.approx(stats.betabinom.logpmf(rounds.accepted, 4, alpha, beta).sum(), rel=1e-9)
    geometric = fit_distribution("beta-geometric", rounds, LATENCY)
    capped = fit_distribution("capped-geometric", rounds, LATENCY)
    # The capped geometric is the beta-geometric's limit, so the mixture fits at least as well,
    # and on over-dispersed data it wins by AIC.
    assert geometric.loglike >= capped.loglike - 1e-6
    assert geometric.aic < capped.aic
    assert geometric.converged


def test_chi_square_pools_and_counts_df():
    observed, expected = pool_bins(np.array([50, 30, 10, 3, 1, 6]), np.array([48, 31, 12, 4, 2, 3]))
    assert (expected >= 5).all()
    assert observed.sum() == 100
    test = chi_square(np.array([50, 30, 10, 3, 1, 6]), np.array([48, 31, 12, 4, 2, 3]), fitted_params=1)
    assert test.bins == len(expected)
    assert test.df == test.bins - 2
    assert test.pvalue == pytest.approx(stats.chi2.sf(test.statistic, test.df))


def test_chi_square_accepts_true_model():
    rounds = rounds_of(requests=40, rounds_per_request=50, draft_len=(3, 5), acceptance=0.65, seed=4)
    fit = fit_distribution("capped-geometric", rounds, LATENCY)
    assert set(fit.chi2_by_draft_len) == {3, 5}
    assert fit.chi2_by_draft_len[5].df == fit.chi2_by_draft_len[5].bins - 2
    assert fit.chi2_pvalue > 0.001  # seeded data drawn from this very model
    assert fit_distribution("binomial", rounds, LATENCY).chi2_pvalue < 1e-6


def test_empirical_only_heldout():
    rounds = rounds_of(requests=10, rounds_per_request=20, draft_len=(4,), seed=5)
    fit = fit_distribution("empirical", rounds, LATENCY)
    assert np.isnan(fit.aic)
    assert np.isnan(fit.chi2_pvalue)
    assert np.isfinite(fit.heldout_loglike(rounds_of(requests=3, rounds_per_request=20, draft_len=(4,), seed=6)))


def test_all_accepted_fits():
    rounds = rounds_of(requests=4, rounds_per_request=10, acceptance=1.0, draft_len=(3,))
    assert fit_distribution("capped-geometric", rounds, LATENCY).fitted_params["rate"] == 1.0
    assert fit_distribution("binomial", rounds, LATENCY).loglike == 0.0
    beta = fit_distribution("beta-geometric", rounds, LATENCY)
    assert not beta.converged  # the likelihood grows without bound as alpha / beta grows
    held_out = rounds_of(requests=2, rounds_per_request=5, acceptance=0.5, draft_len=(3,), seed=9)
    assert fit_distribution("capped-geometric", rounds, LATENCY).heldout_loglike(held_out) == -np.inf


def test_none_accepted_fits():
    rounds = rounds_of(requests=4, rounds_per_request=10, acceptance=0.0, draft_len=(3,))
    assert capped_geometric_mle(rounds.accepted, rounds.draft_len) == 0.0
    assert fit_distribution("capped-geometric", rounds, LATENCY).loglike == 0.0
    assert fit_distribution("binomial", rounds, LATENCY).fitted_params["p"] == 0.0


def test_no_drafting_round_rejected():
    rounds = rounds_of(requests=2, rounds_per_request=3, draft_len=(0,))
    with pytest.raises(FitError, match="draft_len 0"):
        fit_distribution("binomial", rounds, LATENCY)


def test_glm_loglike_equals_statsmodels():
    rounds = rounds_of(requests=20, rounds_per_request=30, draft_len=(2, 5), confidence_strength=2.0, seed=7)
    fit = fit_distribution("hazard-glm", rounds, LATENCY)
    assert fit.loglike == pytest.approx(fit.details.llf, rel=1e-9)
    assert fit.fitted_params["coefficients"][0] == pytest.approx(fit.details.params[0])


def test_split_keeps_requests_whole():
    rounds = rounds_of(requests=10, rounds_per_request=5, seed=8)
    train, test, held_out = split_by_request(rounds, 0.3, seed=1)
    assert held_out
    assert not set(train.request) & set(test.request)
    assert len(train) + len(test) == len(rounds)
    assert len(test.requests) == 3


def test_single_request_in_sample():
    rounds = rounds_of(requests=1, rounds_per_request=1)
    train, test, held_out = split_by_request(rounds)
    assert not held_out
    assert len(train) == len(test) == 1


def test_truncated_round_stats_exact():
    rounds = rounds_of(requests=1, rounds_per_request=3, draft_len=(4,), latency_noise=0.0)
    rounds = rounds.__class__(**{**rounds.__dict__, "accepted": np.array([2, 4, 0]),
                                 "second_match": np.array([1.0, np.nan, 0.0])})
    settings = ScoreSettings(LATENCY, bonus_guess_rate=0.5, correction_guess_rate=0.2, per_token_rate=0.5)
    tokens, kept, accepted = expected_round_stats(rounds, np.array([1, 4, 0]), np.array([1, 4, 6]), settings)
    assert accepted[0] == 1  # drafted 1 of the recorded 4, the first accepted
    assert kept[0] == 1.0  # predicted 1 == accepted and the draft's next token is known accepted
    assert accepted[1] == 4
    assert kept[1] == 0.5  # the bonus token is past the recorded drafts
    assert accepted[2] == 0  # rejected at 0, so more drafts change nothing
    assert kept[2] == 0.0  # predicted 0 matches, but the recorded second-best token missed
    assert tokens.tolist() == [2.0, 5.0, 1.0]
    ms = expected_round_ms(rounds, np.array([1, 4, 6]), kept, LATENCY)
    draft, verify = LATENCY.draft_ms(np.array([1, 4, 6])), LATENCY.verify_ms(np.array([2, 5, 7]), rounds.context_len)
    # Each round hides min(its drafting, the previous verification) times the previous kept chance.
    np.testing.assert_allclose(ms, [verify[0] + draft[0], verify[1] + draft[1] - min(draft[1], verify[0]),
                                    verify[2] + draft[2] - 0.5 * min(draft[2], verify[1])])


def test_censored_round_uses_rate():
    rounds = rounds_of(requests=1, rounds_per_request=1, draft_len=(2,), acceptance=1.0)
    settings = ScoreSettings(LATENCY, bonus_guess_rate=1.0, correction_guess_rate=1.0, per_token_rate=0.5)
    tokens, kept, accepted = expected_round_stats(rounds, np.array([2]), np.array([4]), settings)
    assert accepted[0] == pytest.approx(2 + 0.5 + 0.25)
    assert kept[0] == pytest.approx(0.5)  # P(the first extra draft is rejected)


def test_bootstrap_intervals_cover_estimate():
    rounds = rounds_of(requests=20, rounds_per_request=20, draft_len=(4,), seed=10)
    settings = ScoreSettings(LATENCY, 0.5, 0.5, rounds.per_token_rate())
    score = score_predictor("static", StaticPredictor("all", draft_len=4), rounds, settings, resamples=100)
    for metric in ("hit_rate", "mae", "speed"):
        low, high = score.intervals[metric]
        assert low <= getattr(score, metric) <= high
    identical = np.tile([[1.0, 2.0, 4.0, 6.0, 60.0, 6.0, 60.0]], (5, 1))
    low, high = bootstrap_intervals(identical, resamples=50)["speed"]
    assert low == pytest.approx(high)


def test_evaluate_ranks_by_speed():
    rounds = rounds_of(requests=12, rounds_per_request=30, draft_len=(2, 4), confidence_strength=1.0, seed=11)
    train, test, held_out = split_by_request(rounds, 0.3, seed=0)
    evaluation = evaluate(train, test, held_out, resamples=20)
    speeds = [score.speed for score in evaluation.scores]
    assert speeds == sorted(speeds, reverse=True)
    assert {"binomial", "capped-geometric", "beta-binomial", "beta-geometric", "empirical",
            "hazard-glm"} <= set(evaluation.fits)
    assert evaluation.winner.name == evaluation.scores[0].name
