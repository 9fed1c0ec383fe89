"""Maximum-likelihood fits of the accepted count, with the statistics that compare them.

``Rounds`` gathers the per-round arrays of one or more trace tables. ``fit_distribution`` fits one
family from ``bpsim.predictors.distribution`` (or the hazard GLM of
``bpsim.predictors.features``) and returns a ``FitResults`` whose documented properties are the
log-likelihood, AIC, BIC and the chi-square goodness-of-fit test. Every family gives a pmf per
round, so one code path scores them all. The binomial and capped-geometric MLEs have closed
forms; the beta mixtures are fitted with ``scipy.optimize.minimize`` on ``scipy.stats`` /
``scipy.special`` log-pmfs; the GLM with statsmodels.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import optimize, stats

from bpsim.errors import BpsimError
from bpsim.jsonsafe import json_safe
from bpsim.latency import LatencyModel
from bpsim.predictors.base import BatchFeatures
from bpsim.predictors.distribution import (BetaBinomialPredictor, BetaGeometricPredictor, BinomialPredictor,
                                           CappedGeometricPredictor, DistributionPredictor, EmpiricalPredictor,
                                           beta_binomial_logpmf, beta_geometric_logpmf)
from bpsim.predictors.features import HazardGLMPredictor, hazard_pmf

logger = logging.getLogger(__name__)

DISTRIBUTION_FAMILIES = ("binomial", "capped-geometric", "beta-binomial", "beta-geometric", "empirical")
MIN_EXPECTED = 5.0  # chi-square bins are pooled until each expects at least this many rounds
LOG_SHAPE_BOUNDS = (-7.0, 12.0)  # bounds of log(alpha) and log(beta) for the beta mixtures


class FitError(BpsimError, ValueError):
    """Traces that cannot be fitted, for example with no drafting round."""


# ---------------------------------------------------------------------------------------------
# Per-round data


def sampling_mode(metadata: dict) -> str:
    """Return ``greedy`` or ``sample`` from a trace's sampling settings."""
    sampling = metadata.get("sampling") or {}
    if isinstance(sampling, dict) and sampling.get("mode") in ("greedy", "sample"):
        return sampling["mode"]
    temperature = sampling.get("temperature", 0.0) if isinstance(sampling, dict) else 0.0
    return "greedy" if not temperature else "sample"


def model_pair(metadata: dict) -> str:
    """Return ``target -> draft`` with weight hashes where recorded, the key that pooling compares."""
    def describe(value):
        if isinstance(value, dict):
            sha = value.get("sha256")
            return f"{value.get('name')}@{sha[:12]}" if sha else str(value.get("name"))
        return str(value)

    return f"{describe(metadata.get('target'))} -> {describe(metadata.get('draft'))}"


def suite_name(metadata: dict) -> str:
    suite = metadata.get("suite")
    if isinstance(suite, dict):
        suite = suite.get("name")
    return str(suite) if suite else "unknown"


def list_matrix(column: pa.ChunkedArray, lengths: np.ndarray, width: int, fill=np.nan) -> np.ndarray:
    """Return a list column as a (rows, width) float matrix padded with ``fill``."""
    column = column.combine_chunks()
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(float)
    rows = pc.list_parent_indices(column).to_numpy()
    matrix = np.full((len(lengths), width), fill, dtype=float)
    if len(values):
        offsets = np.r_[0, np.cumsum(lengths)][:-1]
        matrix[rows, np.arange(len(values)) - offsets[rows]] = values
    return matrix


@dataclass(frozen=True)
class Rounds:
    """Per-round arrays of one or more traces; every array is (rounds,) unless noted.

    ``request`` numbers the requests of all traces from 0 and keeps each request's rounds
    contiguous and in order. ``second_match`` is 1 when the draft's second-best token at the
    rejected position equals the target's correction, 0 when not, NaN in fully accepted rounds.
    """

    request: np.ndarray
    draft_len: np.ndarray
    accepted: np.ndarray
    context_len: np.ndarray
    position: np.ndarray
    draft_ms: np.ndarray
    verify_ms: np.ndarray
    round_ms: np.ndarray
    draft_max_prob: np.ndarray  # (rounds, width), NaN past draft_len
    draft_entropy: np.ndarray  # (rounds, width), NaN past draft_len
    second_match: np.ndarray
    suite: np.ndarray  # str per round
    mode: np.ndarray  # greedy or sample per round
    pair: np.ndarray  # model pair per round
    sources: tuple[str, ...] = ()
    request_names: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))  # (requests,) str

    @classmethod
    def from_tables(cls, tables: list[tuple[str, pa.Table]]) -> "Rounds":
        """Gather validated trace tables, given as ``(source, table)`` pairs with their metadata."""
        from bpsim.traces import trace_metadata, validate_trace

        parts, names, offset = [], [], 0
        for source, table in tables:
            metadata = trace_metadata(table)
            table = validate_trace(table, source)
            parts.append(cls._from_table(table, metadata, offset))
            request = table.column("request_id").to_numpy()
            starts = np.r_[True, request[1:] != request[:-1]] if len(request) else np.zeros(0, bool)
            names.extend(f"{source}#{r}" for r in request[starts])
            offset += int(starts.sum())
        if not parts:
            raise FitError("no trace given; pass at least one trace file")
        width = max(p.draft_max_prob.shape[1] for p in parts)
        merged = {}
        for name in cls.__dataclass_fields__:
            if name in ("sources", "request_names"):
                continue
            arrays = [getattr(p, name) for p in parts]
            if arrays[0].ndim == 2:
                arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=np.nan) for a in arrays]
            merged[name] = np.concatenate(arrays)
        return cls(**merged, sources=tuple(source for source, _ in tables), request_names=np.array(names, dtype=object))

    @classmethod
    def _from_table(cls, table: pa.Table, metadata: dict, request_offset: int) -> "Rounds":
        def ints(name):
            return table.column(name).to_numpy(zero_copy_only=False).astype(np.int64)

        def floats(name):
            return table.column(name).to_numpy(zero_copy_only=False).astype(float)

        draft_len, accepted = ints("draft_len"), ints("accepted")
        request_id = ints("request_id")
        starts = np.r_[True, request_id[1:] != request_id[:-1]] if len(request_id) else np.zeros(0, bool)
        request = np.cumsum(starts) - 1 + request_offset
        width = max(int(draft_len.max(initial=0)), 1)
        second = list_matrix(table.column("draft_second_tokens"), draft_len, width, fill=-1)
        tokens = list_matrix(table.column("tokens"), ints("emitted"), width + 1, fill=-2)
        rejected = accepted < draft_len
        index = np.minimum(accepted, width - 1)
        rows = np.arange(len(accepted))
        second_match = np.where(rejected, (second[rows, index] == tokens[rows, np.minimum(accepted, width)]), np.nan)
        rounds = len(draft_len)
        return cls(
            request=request, draft_len=draft_len, accepted=accepted, context_len=ints("context_len"),
            position=ints("position"), draft_ms=floats("draft_ms"), verify_ms=floats("verify_ms"),
            round_ms=floats("round_ms"),
            draft_max_prob=list_matrix(table.column("draft_max_prob"), draft_len, width),
            draft_entropy=list_matrix(table.column("draft_entropy"), draft_len, width),
            second_match=second_match.astype(float),
            suite=np.full(rounds, suite_name(metadata), dtype=object),
            mode=np.full(rounds, sampling_mode(metadata), dtype=object),
            pair=np.full(rounds, model_pair(metadata), dtype=object),
        )

    def __len__(self) -> int:
        return len(self.draft_len)

    @property
    def requests(self) -> np.ndarray:
        """Distinct request numbers, in order of appearance."""
        return np.unique(self.request)

    def subset(self, mask: np.ndarray) -> "Rounds":
        """Return the rounds where ``mask`` is true, keeping their order."""
        mask = np.asarray(mask, dtype=bool)
        values = {name: getattr(self, name)[mask] for name in self.__dataclass_fields__
                  if name not in ("sources", "request_names")}
        return replace(self, **values)

    def batch_features(self) -> BatchFeatures:
        return BatchFeatures(request_id=self.request, draft_len=self.draft_len, draft_max_prob=self.draft_max_prob,
                             draft_entropy=self.draft_entropy, position=self.position, context_len=self.context_len)

    def latency_model(self) -> LatencyModel:
        """Fit the latency model on these rounds' draft_ms and verify_ms."""
        return LatencyModel.fit(self.draft_len, self.draft_ms, self.verify_ms, self.context_len)

    def guess_rates(self) -> tuple[float, float]:
        """Return ``(bonus_guess_rate, correction_guess_rate)`` estimated from these rounds.

        The correction guess is measured: the share of rejections whose correction equals the draft's
        second-best token. The bonus guess is the draft's next token after its last draft. No trace
        records that token, so the rate is estimated by the acceptance rate of the first drafted
        token. Each rate is 0.5 when no round informs it.
        """
        judged = ~np.isnan(self.second_match)
        correction = float(np.mean(self.second_match[judged])) if judged.any() else 0.5
        drafted = self.draft_len > 0
        bonus = float(np.mean(self.accepted[drafted] > 0)) if drafted.any() else 0.5
        return bonus, correction

    def per_token_rate(self) -> float:
        """Return the capped-geometric MLE of the per-token acceptance rate, S / (S + F)."""
        drafted = self.draft_len > 0
        successes = float(self.accepted[drafted].sum())
        failures = float((self.accepted[drafted] < self.draft_len[drafted]).sum())
        return successes / (successes + failures) if successes + failures else 0.0


def split_by_request(rounds: Rounds, test_fraction: float = 0.3, seed: int = 0) -> tuple[Rounds, Rounds, bool]:
    """Split whole requests into train and test sets; return ``(train, test, held_out)``.

    Requests are drawn within each (suite, sampling mode) group, so every group with at least two
    requests has test requests for its stratum. With a single request there is nothing to hold
    out, so both sets are that request and ``held_out`` is false. Reports must then call the
    scores in-sample.
    """
    if not 0.0 < test_fraction < 1.0:
        raise FitError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if len(rounds.requests) < 2:
        logger.warning("only one request: training and testing on the same rounds (in-sample scores)")
        return rounds, rounds, False
    rng = np.random.default_rng(seed)
    starts = np.r_[True, rounds.request[1:] != rounds.request[:-1]]
    group_of_request = {int(r): (s, m) for r, s, m in zip(rounds.request[starts], rounds.suite[starts], rounds.mode[starts])}
    test_requests = []
    for group in sorted(set(group_of_request.values())):
        members = np.array([r for r, g in group_of_request.items() if g == group])
        if len(members) < 2:
            continue
        count = min(max(1, int(round(test_fraction * len(members)))), len(members) - 1)
        test_requests.extend(rng.choice(members, size=count, replace=False).tolist())
    if not test_requests:  # every group has one request: hold out whole groups instead
        requests = rounds.requests
        count = min(max(1, int(round(test_fraction * len(requests)))), len(requests) - 1)
        test_requests = rng.choice(requests, size=count, replace=False).tolist()
    in_test = np.isin(rounds.request, test_requests)
    return rounds.subset(~in_test), rounds.subset(in_test), True


# ---------------------------------------------------------------------------------------------
# Goodness of fit


@dataclass(frozen=True)
class ChiSquareTest:
    """Pearson's chi-square test of observed against expected counts, after pooling sparse bins."""

    statistic: float
    df: int
    pvalue: float  # NaN when df < 1
    bins: int


def pool_bins(observed: np.ndarray, expected: np.ndarray, min_expected: float = MIN_EXPECTED
              ) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent bins, left to right, until each expects at least ``min_expected`` counts.

    A short last group is merged into the one before it.
    """
    pooled_observed, pooled_expected = [], []
    current_observed = current_expected = 0.0
    for o, e in zip(observed, expected):
        current_observed += o
        current_expected += e
        if current_expected >= min_expected:
            pooled_observed.append(current_observed)
            pooled_expected.append(current_expected)
            current_observed = current_expected = 0.0
    if current_expected > 0 or current_observed > 0:
        if pooled_expected:
            pooled_observed[-1] += current_observed
            pooled_expected[-1] += current_expected
        else:
            pooled_observed.append(current_observed)
            pooled_expected.append(current_expected)
    return np.array(pooled_observed), np.array(pooled_expected)


def chi_square(observed: np.ndarray, expected: np.ndarray, fitted_params: int) -> ChiSquareTest:
    """Return the chi-square test with df = pooled bins - 1 - fitted_params."""
    pooled_observed, pooled_expected = pool_bins(np.asarray(observed, float), np.asarray(expected, float))
    bins = len(pooled_expected)
    positive = pooled_expected > 0
    statistic = float(np.sum((pooled_observed[positive] - pooled_expected[positive]) ** 2 / pooled_expected[positive]))
    if np.any(~positive & (pooled_observed > 0)):
        statistic = np.inf  # a count in a bin the model gives probability 0
    df = bins - 1 - fitted_params
    pvalue = float(stats.chi2.sf(statistic, df)) if df >= 1 else float("nan")
    return ChiSquareTest(statistic, df, pvalue, bins)


# ---------------------------------------------------------------------------------------------
# Fit results


@dataclass
class FitResults:
    """A fitted acceptance model and its statistics on the rounds it was fitted on.

    Properties, as in statsmodels results:

    - ``loglike``: sum over drafting rounds of log P(accepted | draft_len) at the fitted parameters.
    - ``aic`` = 2 k - 2 loglike and ``bic`` = k log(nobs) - 2 loglike, with k = ``k_params`` and
      nobs the drafting rounds; NaN for the empirical histogram, which is judged only by
      held-out likelihood.
    - ``chi2_by_draft_len``: per draft_len, Pearson's test with df = bins - 1 - k.
    - ``chi2`` / ``chi2_pvalue``: the same test over all draft lengths at once, with
      df = sum of (bins - 1) - k, because the parameters are shared.
    """

    family: str
    predictor: DistributionPredictor
    k_params: int
    nobs: int
    loglike: float
    converged: bool = True
    fitted_params: dict = field(default_factory=dict)
    chi2_by_draft_len: dict = field(default_factory=dict)
    chi2_total: ChiSquareTest | None = None
    details: object = None  # statsmodels GLMResults for the hazard GLM

    @property
    def judged_by_likelihood_only(self) -> bool:
        return self.family == "empirical"

    @property
    def aic(self) -> float:
        return float("nan") if self.judged_by_likelihood_only else 2 * self.k_params - 2 * self.loglike

    @property
    def bic(self) -> float:
        if self.judged_by_likelihood_only:
            return float("nan")
        return self.k_params * np.log(max(self.nobs, 1)) - 2 * self.loglike

    @property
    def chi2(self) -> float:
        return float("nan") if self.chi2_total is None else self.chi2_total.statistic

    @property
    def chi2_pvalue(self) -> float:
        return float("nan") if self.chi2_total is None else self.chi2_total.pvalue

    @property
    def chi2_df(self) -> int:
        return -1 if self.chi2_total is None else self.chi2_total.df

    def round_pmfs(self, rounds: Rounds) -> np.ndarray:
        return round_pmfs(self.predictor, rounds)

    def heldout_loglike(self, rounds: Rounds) -> float:
        """Sum of log P(accepted) over the drafting rounds of ``rounds`` (usually the test split)."""
        return float(round_loglike(self.predictor, rounds).sum())

    def summary(self) -> dict:
        """JSON-safe statistics (infinities and NaN as None)."""
        return json_safe({
            "family": self.family, "params": self.fitted_params, "k_params": self.k_params, "nobs": self.nobs,
            "loglike": self.loglike, "aic": self.aic, "bic": self.bic, "chi2": self.chi2,
            "chi2_df": self.chi2_df, "chi2_pvalue": self.chi2_pvalue, "converged": self.converged,
            "chi2_by_draft_len": {str(n): {"statistic": t.statistic, "df": t.df, "pvalue": t.pvalue, "bins": t.bins}
                                  for n, t in sorted(self.chi2_by_draft_len.items())},
        })


def round_pmfs(predictor: DistributionPredictor, rounds: Rounds) -> np.ndarray:
    """Return each round's accepted-count pmf, (rounds, max draft_len + 1), zero past draft_len."""
    width = int(rounds.draft_len.max(initial=0))
    if isinstance(predictor, HazardGLMPredictor):
        max_prob, entropy = rounds.draft_max_prob, rounds.draft_entropy
        if max_prob.shape[1] < max(width, 1):
            pad = ((0, 0), (0, max(width, 1) - max_prob.shape[1]))
            max_prob, entropy = (np.pad(m, pad, constant_values=np.nan) for m in (max_prob, entropy))
        return hazard_pmf(predictor.hazard(max_prob[:, :max(width, 1)], entropy[:, :max(width, 1)]),
                          rounds.draft_len)[:, :width + 1]
    pmfs = np.zeros((len(rounds), width + 1))
    for n in np.unique(rounds.draft_len):
        pmfs[rounds.draft_len == n, :n + 1] = predictor.pmf(int(n))
    return pmfs


def round_loglike(predictor: DistributionPredictor, rounds: Rounds) -> np.ndarray:
    """Return log P(accepted) of each drafting round; rounds with draft_len 0 carry no information."""
    drafted = rounds.subset(rounds.draft_len > 0)
    if len(drafted) == 0:
        return np.zeros(0)
    pmfs = round_pmfs(predictor, drafted)
    with np.errstate(divide="ignore"):
        return np.log(pmfs[np.arange(len(drafted)), drafted.accepted])


def _finish(family: str, predictor: DistributionPredictor, rounds: Rounds, k_params: int, fitted_params: dict,
            converged: bool = True, details=None) -> FitResults:
    drafted = rounds.subset(rounds.draft_len > 0)
    loglike = float(round_loglike(predictor, drafted).sum())
    results = FitResults(family, predictor, k_params, len(drafted), loglike, converged, fitted_params, details=details)
    if family == "empirical":
        return results
    pmfs = round_pmfs(predictor, drafted)
    total_statistic, total_df = 0.0, -k_params
    for n in np.unique(drafted.draft_len):
        rows = drafted.draft_len == n
        observed = np.bincount(drafted.accepted[rows], minlength=n + 1)[:n + 1]
        expected = pmfs[rows, :n + 1].sum(axis=0)
        test = chi_square(observed, expected, k_params)
        results.chi2_by_draft_len[int(n)] = test
        total_statistic += test.statistic
        total_df += test.bins - 1
    pvalue = float(stats.chi2.sf(total_statistic, total_df)) if total_df >= 1 else float("nan")
    results.chi2_total = ChiSquareTest(total_statistic, total_df, pvalue, sum(t.bins for t in results.chi2_by_draft_len.values()))
    return results


# ---------------------------------------------------------------------------------------------
# Maximum-likelihood estimators


def binomial_mle(accepted, draft_len) -> float:
    """p = sum accepted / sum draft_len over drafting rounds."""
    return float(np.sum(accepted) / np.sum(draft_len))


def capped_geometric_mle(accepted, draft_len) -> float:
    """rate = S / (S + F): S accepted drafts, F rounds that ended in a rejection (accepted < draft_len)."""
    accepted, draft_len = np.asarray(accepted), np.asarray(draft_len)
    successes = float(accepted.sum())
    failures = float((accepted < draft_len).sum())
    return successes / (successes + failures) if successes + failures else 0.0


def beta_mixture_mle(logpmf, accepted, draft_len, mean_rate: float) -> tuple[float, float, bool]:
    """Fit (alpha, beta) of a beta mixture by L-BFGS-B on log(alpha), log(beta); return them and convergence."""
    accepted, draft_len = np.asarray(accepted, dtype=float), np.asarray(draft_len, dtype=float)

    def negative_loglike(log_shapes):
        alpha, beta = np.exp(log_shapes)
        value = -np.sum(logpmf(accepted, draft_len, alpha, beta))
        return value if np.isfinite(value) else 1e300

    mean = min(max(mean_rate, 0.02), 0.98)
    start = np.log([mean * 5.0, (1.0 - mean) * 5.0])
    result = optimize.minimize(negative_loglike, start, method="L-BFGS-B", bounds=[LOG_SHAPE_BOUNDS] * 2)
    alpha, beta = np.exp(result.x)
    at_bound = np.any(np.isclose(result.x, LOG_SHAPE_BOUNDS[0]) | np.isclose(result.x, LOG_SHAPE_BOUNDS[1]))
    return float(alpha), float(beta), bool(result.success and not at_bound)


def fit_distribution(family: str, rounds: Rounds, latency: LatencyModel, **predictor_options) -> FitResults:
    """Fit one family by maximum likelihood on ``rounds`` and return its results.

    ``predictor_options`` (max_draft_len, draft_lens, bonus_guess_rate, correction_guess_rate)
    configure the predictor that the results carry.
    """
    drafted = rounds.subset(rounds.draft_len > 0)
    if len(drafted) == 0:
        raise FitError("no round drafted any token (draft_len 0 everywhere), so there is no accepted count to fit")
    accepted, draft_len = drafted.accepted, drafted.draft_len
    options = {"latency": latency, **predictor_options}
    if family == "binomial":
        p = binomial_mle(accepted, draft_len)
        return _finish(family, BinomialPredictor(p, **options), rounds, 1, {"p": p})
    if family == "capped-geometric":
        rate = capped_geometric_mle(accepted, draft_len)
        return _finish(family, CappedGeometricPredictor(rate, **options), rounds, 1, {"rate": rate})
    if family in ("beta-binomial", "beta-geometric"):
        logpmf = beta_binomial_logpmf if family == "beta-binomial" else beta_geometric_logpmf
        mean_rate = binomial_mle(accepted, draft_len) if family == "beta-binomial" else capped_geometric_mle(accepted, draft_len)
        alpha, beta, converged = beta_mixture_mle(logpmf, accepted, draft_len, mean_rate)
        # All accepted or none accepted: the likelihood only approaches its supremum as a shape
        # parameter runs off to 0 or infinity, so whatever point the optimizer stops at is no MLE.
        converged = converged and 0.0 < mean_rate < 1.0
        if not converged:
            logger.warning("%s fit reached a bound (alpha %.3g, beta %.3g): the data show no over-dispersion "
                           "or the rate is 0 or 1", family, alpha, beta)
        cls = BetaBinomialPredictor if family == "beta-binomial" else BetaGeometricPredictor
        return _finish(family, cls(alpha, beta, **options), rounds, 2, {"alpha": alpha, "beta": beta}, converged)
    if family == "empirical":
        counts = {str(n): np.bincount(accepted[draft_len == n], minlength=n + 1).tolist() for n in np.unique(draft_len)}
        predictor = EmpiricalPredictor(counts, **options)
        k_params = int(sum(int(n) for n in counts))
        return _finish(family, predictor, rounds, k_params, {"counts": counts})
    if family == "hazard-glm":
        return fit_hazard_glm(rounds, latency, **predictor_options)
    raise FitError(f"unknown family {family!r}; choose from {', '.join(DISTRIBUTION_FAMILIES + ('hazard-glm',))}")


def has_confidences(rounds: Rounds) -> bool:
    judged = np.arange(rounds.draft_max_prob.shape[1])[None, :] < rounds.draft_len[:, None]
    return bool(judged.any()) and not np.isnan(rounds.draft_max_prob[judged]).any()


def fit_hazard_glm(rounds: Rounds, latency: LatencyModel, **predictor_options) -> FitResults:
    """Fit the discrete-hazard GLM on judged tokens; its loglike is that of the accepted counts."""
    drafted = rounds.subset(rounds.draft_len > 0)
    if len(drafted) == 0 or not has_confidences(drafted):
        raise FitError("the hazard GLM needs drafting rounds with draft_max_prob and draft_entropy recorded")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # perfect separation is reported through ``converged``
        predictor, results = HazardGLMPredictor.fit(drafted.draft_len, drafted.accepted, drafted.draft_max_prob,
                                                    drafted.draft_entropy, latency=latency, **predictor_options)
    converged = bool(getattr(results, "converged", True))
    params = {"coefficients": predictor.coefficients, "mean_features": predictor.mean_features}
    return _finish("hazard-glm", predictor, rounds, len(predictor.coefficients), params, converged, details=results)
