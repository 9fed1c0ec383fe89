"""The latency model: what a round costs, fitted from the recorded draft_ms and verify_ms.

draft_ms(n)          = draft_overhead_ms + n * draft_ms_per_token            (0 when n = 0)
verify_ms(t, ctx)    = verify_base_ms + t * verify_ms_per_token + ctx * verify_ms_per_context
round_ms(n, ctx)     = draft_ms(n) + verify_ms(n + 1, ctx)
predraft_ms(m, b)    = draft_ms(m) * (1 + (b - 1) * branch_batch_cost)
predraft_cost(m, V, b) = predraft_ms(m, b) - predraft_overlap * min(predraft_ms(m, b), V) + predraft_overhead_ms

A speculative round with draft_len n verifies n + 1 tokens (the last accepted token and the n
drafts); plain target decoding is the n = 0 round. While the target verifies (V =
verify_ms(n + 1, ctx)), a pre-draft of the next round's m tokens runs concurrently on b branch
points (b > 1 is the exhaustive strategy, batched). The round that launches a pre-draft pays
``predraft_cost`` on its critical path, hit or miss: the pre-draft's compute less the part that
ran hidden beside verification, plus a fixed overhead (launch and check). On a hit the next
round's drafts are ready and it drafts nothing; on a miss the pre-draft was paid for in vain
and the next round drafts from scratch.

``predraft_overlap`` is the fraction of the overlappable pre-draft time (at most the
verification window) that concurrency hides. It is negative where running the pre-draft beside
verification costs more than running it afterwards, as on a CPU whose few cores both models
then share with fewer threads each.

Some coefficients cannot be identified from the traces, for example the per-token verify slope
when every round used one draft_len, or the pre-draft overlap of a trace recorded without
pre-drafting. Each of them is set by an explicit assumption, listed in ``assumed`` and printed
by ``describe``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass

import numpy as np

from bpsim.errors import BpsimError

logger = logging.getLogger(__name__)


# Fields a user may set by assumption (``with_assumptions``, ``bpsim replay --assume``).
ASSUMABLE_FIELDS = ("draft_ms_per_token", "draft_overhead_ms", "verify_base_ms", "verify_ms_per_token",
                    "verify_ms_per_context", "predraft_overlap", "predraft_overhead_ms", "branch_batch_cost")
# Rounds without a concurrent pre-draft needed before the verify fit uses only those rounds.
MIN_ROUNDS_WITHOUT_PREDRAFT = 10
# Relative spread of the overlappable pre-draft time below which the overhead cannot be told apart
# from the overlap, so only the overlap is fitted.
MIN_HIDEABLE_SPREAD = 0.1


class LatencyModelError(BpsimError, ValueError):
    """Timings from which no latency model can be fitted."""


@dataclass(frozen=True)
class LatencyModel:
    draft_ms_per_token: float
    verify_base_ms: float
    draft_overhead_ms: float = 0.0
    verify_ms_per_token: float = 0.0
    verify_ms_per_context: float = 0.0
    # Fraction of the overlappable pre-draft time (at most the verification window) that runs hidden;
    # negative when concurrency slows the round down by more than the pre-draft costs run alone.
    predraft_overlap: float = 1.0
    # Critical-path cost of one pre-draft (launch, check, contention), paid on hits and misses (ms).
    predraft_overhead_ms: float = 0.0
    # Draft cost of each extra branch in a batched pre-draft, relative to one branch
    # (0 = extra branches are free, 1 = each costs as much as drafting it alone).
    branch_batch_cost: float = 1.0
    assumed: tuple[str, ...] = ()  # names of the fields set by assumption rather than fitted
    rounds: int = 0  # rounds the fit used

    def __post_init__(self):
        for name in ("draft_ms_per_token", "verify_base_ms", "draft_overhead_ms", "verify_ms_per_token",
                     "verify_ms_per_context", "predraft_overhead_ms", "branch_batch_cost"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise LatencyModelError(f"latency model field {name} must be finite and >= 0, got {value}")
        if not -1.0 <= self.predraft_overlap <= 1.0:
            raise LatencyModelError(f"predraft_overlap must lie in [-1, 1], got {self.predraft_overlap}")
        object.__setattr__(self, "assumed", tuple(self.assumed))

    def draft_ms(self, draft_len):
        draft_len = np.asarray(draft_len, dtype=float)
        return np.where(draft_len > 0, self.draft_overhead_ms + draft_len * self.draft_ms_per_token, 0.0)

    def verify_ms(self, tokens, context_len=0.0):
        return (self.verify_base_ms + np.asarray(tokens, dtype=float) * self.verify_ms_per_token
                + np.asarray(context_len, dtype=float) * self.verify_ms_per_context)

    def round_ms(self, draft_len, context_len=0.0):
        """Sequential (no pre-drafting) wall time of a round with ``draft_len`` drafts."""
        return self.draft_ms(draft_len) + self.verify_ms(np.asarray(draft_len) + 1, context_len)

    def target_ms_per_token(self, context_len=0.0):
        return self.verify_ms(1, context_len)

    def predraft_ms(self, draft_len, branches=1):
        """Draft compute of a pre-draft of ``draft_len`` tokens on each of ``branches`` batched branch points."""
        batch_factor = 1.0 + (np.asarray(branches, dtype=float) - 1.0) * self.branch_batch_cost
        return self.draft_ms(draft_len) * batch_factor

    def predraft_cost_ms(self, draft_len, verify_window_ms, branches=1):
        """Critical-path cost of launching a pre-draft of ``draft_len`` tokens beside a verification.

        The round that launches it pays its compute less the part hidden beside the
        ``verify_window_ms`` of verification, plus the fixed overhead; 0 when ``draft_len`` is 0.
        NOTE: a miss is charged in full, while the thread backend cancels a pre-draft that cannot
        hit once verification ends; the two differ only for pre-drafts longer than verification.
        """
        compute = self.predraft_ms(draft_len, branches)
        hidden = self.predraft_overlap * np.minimum(compute, np.asarray(verify_window_ms, dtype=float))
        return np.where(np.asarray(draft_len) > 0, compute - hidden + self.predraft_overhead_ms, 0.0)

    def expected_tokens_per_ms(self, pmf, draft_len: int, context_len: float = 0.0) -> float:
        """Expected tokens per ms of a plain speculative round whose accepted count has ``pmf`` over 0..draft_len."""
        pmf = np.asarray(pmf, dtype=float)
        expected_accepted = float((np.arange(len(pmf)) * pmf).sum())
        return (expected_accepted + 1.0) / float(self.round_ms(draft_len, context_len))

    def describe(self) -> str:
        def mark(name):
            return " (assumed)" if name in self.assumed else ""

        return "\n".join([
            f"latency model fitted on {self.rounds} rounds (ms):",
            f"  draft_ms(n)  = {self.draft_overhead_ms:.3f}{mark('draft_overhead_ms')} + n * "
            f"{self.draft_ms_per_token:.3f}{mark('draft_ms_per_token')}",
            f"  verify_ms(t) = {self.verify_base_ms:.3f}{mark('verify_base_ms')} + t * "
            f"{self.verify_ms_per_token:.3f}{mark('verify_ms_per_token')} + context * "
            f"{self.verify_ms_per_context:.5f}{mark('verify_ms_per_context')}",
            f"  pre-draft: overlap with verification {self.predraft_overlap:.2f}{mark('predraft_overlap')}, "
            f"overhead {self.predraft_overhead_ms:.3f}{mark('predraft_overhead_ms')} ms per pre-draft",
            f"  batched pre-draft: each extra branch costs {self.branch_batch_cost:.2f}"
            f"{mark('branch_batch_cost')} of one branch",
            f"  target alone: {float(self.target_ms_per_token()):.3f} ms/token; verifying 5 tokens costs "
            f"{float(self.verify_ms(5) / self.verify_ms(1)):.2f}x one",
        ])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["assumed"] = list(self.assumed)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyModel":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise LatencyModelError(f"unknown latency model fields {sorted(unknown)}; expected {sorted(known)}")
        required = [field.name for field in dataclasses.fields(cls)
                    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
        assumed = data.get("assumed", [])
        if not isinstance(assumed, (list, tuple)) or not all(isinstance(name, str) for name in assumed):
            raise LatencyModelError(f"the latency model's 'assumed' must be a list of field names, got {assumed!r}")
        unknown_assumed = sorted(set(assumed) - set(ASSUMABLE_FIELDS))
        if unknown_assumed:
            raise LatencyModelError(f"the latency model's 'assumed' lists unknown fields {unknown_assumed}; "
                                    f"choose from {', '.join(ASSUMABLE_FIELDS)}")
        missing = [name for name in required if name not in data]
        if missing:
            raise LatencyModelError(f"the latency model is missing {', '.join(missing)}; "
                                    f"it needs {', '.join(required)}")
        return cls(**data)

    def with_assumptions(self, **values: float) -> "LatencyModel":
        """Return a copy with the given fields set and labelled as assumed."""
        unknown = set(values) - set(ASSUMABLE_FIELDS)
        if unknown:
            raise LatencyModelError(f"unknown latency model fields {sorted(unknown)}; "
                                    f"choose from {', '.join(ASSUMABLE_FIELDS)}")
        data = self.to_dict()
        data.update({name: float(value) for name, value in values.items()})
        data["assumed"] = sorted(set(self.assumed) | set(values))
        return LatencyModel.from_dict(data)

    @classmethod
    def fit(cls, draft_len, draft_ms, verify_ms, context_len=None, predraft_overlap: float | None = None,
            *, predraft_ms=None, round_ms=None, drafts_from_predraft=None, predraft_len=None) -> "LatencyModel":
        """Least-squares fit of the model from per-round arrays (one entry per recorded round).

        ``predraft_ms`` (NaN or 0 where a round ran no pre-draft), ``round_ms`` and ``predraft_len``
        (tokens of each round's pre-draft: the next round's draft_len; 0 where unknown) fit the
        pre-draft overlap and overhead. Without them, or without a pre-drafting round, both are
        assumed (overlap 1, overhead 0) unless ``predraft_overlap`` is given. Rounds flagged in
        ``drafts_from_predraft`` took their drafts from a hit pre-draft, so their draft_ms is left
        out of the draft fit. ``branch_batch_cost`` is never in a trace and is always assumed.
        """
        draft_len = np.asarray(draft_len, dtype=float)
        draft_ms = np.asarray(draft_ms, dtype=float)
        verify_ms = np.asarray(verify_ms, dtype=float)
        context = np.zeros_like(draft_len) if context_len is None else np.asarray(context_len, dtype=float)
        if len(draft_len) == 0:
            raise LatencyModelError("no rounds to fit a latency model on; record a trace first")
        for name, values in (("draft_ms", draft_ms), ("verify_ms", verify_ms)):
            bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
            if len(bad):
                raise LatencyModelError(f"{name} of round {bad[0]} is {values[bad[0]]}; timings must be finite and >= 0")
        from_predraft = (np.zeros(len(draft_len), dtype=bool) if drafts_from_predraft is None
                         else np.asarray(drafts_from_predraft, dtype=bool))
        predrafted = np.zeros(len(draft_len), dtype=bool)
        if predraft_ms is not None:
            predraft_ms = np.asarray(predraft_ms, dtype=float)
            predrafted = np.isfinite(predraft_ms) & (predraft_ms > 0)
        assumed: list[str] = []

        # Draft: slope and intercept over rounds that drafted; one distinct draft_len leaves no intercept.
        drafted = (draft_len > 0) & ~from_predraft
        if not drafted.any():
            raise LatencyModelError("no round drafted any token on its own (draft_len 0 or drafts taken from a "
                                    "pre-draft everywhere); record a speculative trace")
        lengths = np.unique(draft_len[drafted])
        if len(lengths) > 1:
            slope, intercept = np.polyfit(draft_len[drafted], draft_ms[drafted], 1)
            draft_per_token, draft_overhead = max(slope, 1e-6), max(intercept, 0.0)
        else:
            draft_per_token, draft_overhead = float(np.median(draft_ms[drafted] / draft_len[drafted])), 0.0
            assumed.append("draft_overhead_ms")

        # Verify: base + per token + per context token; drop the columns the data cannot identify.
        # A concurrent pre-draft can slow verification down, so the verify fit uses only the rounds
        # without one, and the slowdown shows up in the pre-draft overlap below.
        if predrafted.any() and (~predrafted).sum() < MIN_ROUNDS_WITHOUT_PREDRAFT:
            raise LatencyModelError(
                f"only {(~predrafted).sum()} of {len(predrafted)} rounds ran without a pre-draft beside them, and "
                "verification slowed down by a pre-draft cannot time the target. Give bpsim fit or replay a trace "
                f"recorded without pre-drafting as well ({MIN_ROUNDS_WITHOUT_PREDRAFT} rounds or more, from bpsim "
                "record --draft-len 4 and a target-only one from bpsim record --target-only), and the pre-drafting "
                "trace through --latency-traces; or pass a fitted model with replay --latency FILE")
        quiet = ~predrafted
        tokens = draft_len + 1
        columns = [np.ones_like(tokens)]
        names = ["verify_base_ms"]
        if len(np.unique(tokens[quiet])) > 1:
            columns.append(tokens)
            names.append("verify_ms_per_token")
        else:
            assumed.append("verify_ms_per_token")
        if np.ptp(context[quiet]) > 0:
            columns.append(context)
            names.append("verify_ms_per_context")
        else:
            assumed.append("verify_ms_per_context")
        design = np.stack(columns, axis=1)
        coefficients, *_ = np.linalg.lstsq(design[quiet], verify_ms[quiet], rcond=None)
        _warn_on_stalls(verify_ms[quiet], tokens[quiet])
        fitted = dict(zip(names, coefficients))
        # NOTE: with one verified length the whole verify cost sits in the base, as if verifying
        # k tokens cost the same as one; record at two draft_len values to fit the slope.
        model = cls(
            draft_ms_per_token=float(draft_per_token), draft_overhead_ms=float(draft_overhead),
            verify_base_ms=max(float(fitted["verify_base_ms"]), 0.0),
            verify_ms_per_token=max(float(fitted.get("verify_ms_per_token", 0.0)), 0.0),
            verify_ms_per_context=max(float(fitted.get("verify_ms_per_context", 0.0)), 0.0),
            rounds=len(draft_len),
        )

        # Pre-draft: round_ms = draft + verify + predraft - overlap * min(predraft, verify) + overhead,
        # over the rounds that ran one. The pre-draft's compute is the modelled draft_ms of its
        # length, not the recorded predraft_ms: a pre-draft beside verification may run on fewer
        # threads than drafting alone, and the simulator charges the model's figure.
        overlap, overhead = predraft_overlap, 0.0
        timed = predrafted.copy()
        if round_ms is not None and predraft_len is not None:
            round_ms = np.asarray(round_ms, dtype=float)
            predraft_len = np.asarray(predraft_len, dtype=float)
            timed &= np.isfinite(round_ms) & (predraft_len > 0)
        else:
            timed[:] = False
        # The overlap is read against the verify time of rounds without a pre-draft, so those must
        # identify how verification grows with its tokens; otherwise that error lands in the overlap.
        unidentified = [reason for reason, failed in (
            (f"fewer than {MIN_ROUNDS_WITHOUT_PREDRAFT} rounds ran without a pre-draft",
             (~predrafted).sum() < MIN_ROUNDS_WITHOUT_PREDRAFT),
            ("the rounds without a pre-draft all verified one length", "verify_ms_per_token" in assumed),
        ) if failed]
        if predraft_overlap is None and timed.any() and unidentified:
            logger.warning("pre-draft overlap not fitted: %s; assumed 1. Add a speculative trace recorded without "
                           "--predraft (and a target-only one) to the fit", " and ".join(unidentified))
            timed[:] = False
        if predraft_overlap is None and timed.any():
            # The modelled verify time, so a slowdown of verification by the concurrent pre-draft
            # counts against the overlap.
            verify_model = model.verify_ms(tokens[timed], context[timed])
            compute = model.draft_ms(predraft_len[timed])
            excess = round_ms[timed] - draft_ms[timed] - verify_model - compute
            hideable = np.minimum(compute, verify_model)
            spread = np.ptp(hideable) / max(float(np.mean(hideable)), 1e-12)
            two_parameters = timed.sum() >= 3 and len(np.unique(predraft_len[timed])) > 1 and spread >= MIN_HIDEABLE_SPREAD
            if two_parameters:
                slope, intercept = np.polyfit(hideable, excess, 1)
                overlap, overhead = -slope, intercept
            if not two_parameters or overhead < 0:
                # One pre-draft length (or one hideable time) cannot separate a fixed cost from the
                # overlap, and a negative fixed cost is not physical: fit the overlap alone.
                overlap, overhead = -float(np.sum(excess * hideable) / np.sum(hideable ** 2)), 0.0
                assumed.append("predraft_overhead_ms")
            overlap, overhead = float(np.clip(overlap, -1.0, 1.0)), max(float(overhead), 0.0)
        else:
            if predraft_overlap is None:
                assumed.append("predraft_overlap")
                overlap = 1.0
            assumed.append("predraft_overhead_ms")
        assumed.append("branch_batch_cost")
        return dataclasses.replace(model, predraft_overlap=float(overlap), predraft_overhead_ms=overhead,
                                   assumed=tuple(assumed))


STALL_FACTOR = 5.0  # a verification this many times the median of its length counts as a stall


def _warn_on_stalls(verify_ms: np.ndarray, tokens: np.ndarray) -> None:
    """Warn when verifications took many times the usual time for their length, as on a busy machine."""
    stalls = 0
    for length in np.unique(tokens):
        times = verify_ms[tokens == length]
        stalls += int((times > STALL_FACTOR * np.median(times)).sum())
    if stalls:
        logger.warning("%d of %d verifications took over %gx the median time of their length; another process was "
                       "probably running, and the latency model fitted on them is skewed. Record again on a quiet "
                       "machine", stalls, len(verify_ms), STALL_FACTOR)


def fit_from_table(table) -> LatencyModel:
    """Fit a latency model from a trace table (pyarrow) with the standard trace columns.

    The optional ``predraft_ms`` and ``round_ms`` columns fit the pre-draft overlap and overhead,
    and ``predraft_hit`` marks the rounds whose drafts came from a pre-draft.
    """
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in
               ("draft_len", "draft_ms", "verify_ms", "context_len")}
    optional = {}
    for name in ("predraft_ms", "round_ms"):
        if name in table.column_names:
            optional[name] = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=float)
    if "predraft_ms" in optional and "request_id" in table.column_names:
        optional["predraft_len"] = _next_draft_len(table)
    if "predraft_hit" in table.column_names:
        optional["drafts_from_predraft"] = _drafts_from_predraft(table)
    return LatencyModel.fit(columns["draft_len"], columns["draft_ms"], columns["verify_ms"], columns["context_len"],
                            **optional)


def _next_draft_len(table) -> np.ndarray:
    """Return the draft_len of the next round of the same request, 0 on a request's last round, (rounds,)."""
    draft_len = table.column("draft_len").to_numpy(zero_copy_only=False).astype(float)
    following = np.zeros(len(draft_len))
    if len(draft_len) > 1:
        following[:-1] = np.where(_continues(table), draft_len[1:], 0.0)
    return following


def _continues(table) -> np.ndarray:
    """Flag the rows i whose row i + 1 is the next round of the same request, (rounds - 1,) bool.

    The round number is compared too, so two traces concatenated with the same request ids at
    their boundary do not join.
    """
    request = table.column("request_id").to_numpy(zero_copy_only=False)
    if "round" not in table.column_names:
        return request[1:] == request[:-1]
    number = table.column("round").to_numpy(zero_copy_only=False)
    return (request[1:] == request[:-1]) & (number[1:] == number[:-1] + 1)


def _drafts_from_predraft(table) -> np.ndarray:
    """Flag the rounds whose drafts came from the previous round's pre-draft hit, (rounds,) bool.

    ``predraft_hit`` is read as belonging to the round whose prediction was checked, so the
    drafts it saved belong to the next round of the same request. Null (no pre-draft) counts as
    a miss.
    """
    hit = np.asarray(table.column("predraft_hit").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    following = np.zeros(len(hit), dtype=bool)
    if len(hit) > 1:
        following[1:] = hit[:-1] & _continues(table)
    return following
