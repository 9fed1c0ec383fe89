"""The latency model: what a round costs, fitted from the recorded draft_ms and verify_ms.

draft_ms(n)         = draft_overhead_ms + n * draft_ms_per_token            (0 when n = 0)
verify_ms(t, ctx)   = verify_base_ms + t * verify_ms_per_token + ctx * verify_ms_per_context
round_ms(n, ctx)    = draft_ms(n) + verify_ms(n + 1, ctx)
hidden_ms(m, V, b)  = predraft_overlap * draft_ms(m) * min(1, V / predraft_ms(m, b))
predraft_ms(m, b)   = draft_ms(m) * (1 + (b - 1) * branch_batch_cost)

A speculative round with draft_len n verifies n + 1 tokens (the last accepted token and the n
drafts); plain target decoding is the n = 0 round. While the target verifies (V =
verify_ms(n + 1, ctx)), a pre-draft of the next round's m tokens runs concurrently on b branch
points (b > 1 is the exhaustive strategy, batched). Each pre-draft adds ``predraft_overhead_ms``
to the round on the critical path (launch, check and contention), hit or miss. On a hit the
next round's drafting is cut by ``hidden_ms``: the draft can only run concurrently while the
target verifies, and of that, the fraction ``predraft_overlap``. On a miss the pre-draft is
dropped at the check and the next round drafts from scratch.

Some coefficients cannot be identified from the traces, for example the per-token verify slope
when every round used one draft_len, or the pre-draft overlap of a trace recorded without
pre-drafting. Each of them is set by an explicit assumption, listed in ``assumed`` and printed
by ``describe``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from bpsim.errors import BpsimError


# Fields a user may set by assumption (``with_assumptions``, ``bpsim replay --assume``).
ASSUMABLE_FIELDS = ("draft_ms_per_token", "draft_overhead_ms", "verify_base_ms", "verify_ms_per_token",
                    "verify_ms_per_context", "predraft_overlap", "predraft_overhead_ms", "branch_batch_cost")
# Rounds without a concurrent pre-draft needed before the verify fit uses only those rounds.
MIN_ROUNDS_WITHOUT_PREDRAFT = 10


class LatencyModelError(BpsimError, ValueError):
    """Timings from which no latency model can be fitted."""


@dataclass(frozen=True)
class LatencyModel:
    draft_ms_per_token: float
    verify_base_ms: float
    draft_overhead_ms: float = 0.0
    verify_ms_per_token: float = 0.0
    verify_ms_per_context: float = 0.0
    # Fraction of the hideable draft time (at most the verification window) a kept pre-draft saves.
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
        if not 0.0 <= self.predraft_overlap <= 1.0:
            raise LatencyModelError(f"predraft_overlap must lie in [0, 1], got {self.predraft_overlap}")
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

    def hidden_ms(self, draft_len, verify_window_ms, branches=1):
        """Drafting time of the next round that a kept pre-draft saves.

        The pre-draft runs only while the target verifies (``verify_window_ms``), at the efficiency
        ``predraft_overlap``; with several batched branches the kept one is only that fraction done.
        """
        draft = self.draft_ms(draft_len)
        compute = self.predraft_ms(draft_len, branches)
        done = np.minimum(1.0, np.asarray(verify_window_ms, dtype=float) / np.where(compute > 0, compute, 1.0))
        return self.predraft_overlap * draft * done

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
            *, predraft_ms=None, round_ms=None, drafts_from_predraft=None) -> "LatencyModel":
        """Least-squares fit of the model from per-round arrays (one entry per recorded round).

        ``predraft_ms`` (NaN or 0 where a round ran no pre-draft) and ``round_ms`` fit the pre-draft
        overlap and overhead. Without them, or without a pre-drafting round, both are assumed
        (overlap 1, overhead 0) unless ``predraft_overlap`` is given. Rounds flagged in
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
        # A concurrent pre-draft can slow verification down, so when enough rounds ran without one
        # the verify fit uses only those and the slowdown shows up as pre-draft overhead below.
        quiet = ~predrafted if (~predrafted).sum() >= MIN_ROUNDS_WITHOUT_PREDRAFT else np.ones_like(predrafted)
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

        # Pre-draft: round_ms = draft + verify + predraft - overlap * min(predraft, verify) + overhead
        # over the rounds that ran one, so the unexplained wall time is regressed on the hideable time.
        overlap, overhead = predraft_overlap, 0.0
        timed = predrafted.copy()
        if round_ms is not None:
            round_ms = np.asarray(round_ms, dtype=float)
            timed &= np.isfinite(round_ms)
        if predraft_overlap is None and round_ms is not None and timed.any():
            # The modelled verify time, so a slowdown of verification by the concurrent pre-draft
            # counts as pre-draft overhead when the verify fit used rounds without one.
            verify_model = model.verify_ms(tokens[timed], context[timed])
            excess = round_ms[timed] - draft_ms[timed] - verify_model - predraft_ms[timed]
            hideable = np.minimum(predraft_ms[timed], verify_ms[timed])
            if timed.sum() >= 3 and np.ptp(hideable) > 0:
                slope, intercept = np.polyfit(hideable, excess, 1)
                overlap, overhead = -slope, intercept
            else:
                overlap = -float(np.sum(excess) / np.sum(hideable))
                assumed.append("predraft_overhead_ms")
            overlap, overhead = float(np.clip(overlap, 0.0, 1.0)), max(float(overhead), 0.0)
        else:
            if predraft_overlap is None:
                assumed.append("predraft_overlap")
                overlap = 1.0
            assumed.append("predraft_overhead_ms")
        assumed.append("branch_batch_cost")
        return dataclasses.replace(model, predraft_overlap=float(overlap), predraft_overhead_ms=overhead,
                                   assumed=tuple(assumed))


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
    if "predraft_hit" in table.column_names:
        optional["drafts_from_predraft"] = _drafts_from_predraft(table)
    return LatencyModel.fit(columns["draft_len"], columns["draft_ms"], columns["verify_ms"], columns["context_len"],
                            **optional)


def _drafts_from_predraft(table) -> np.ndarray:
    """Flag the rounds whose drafts came from the previous round's pre-draft hit, (rounds,) bool.

    ``predraft_hit`` is read as belonging to the round whose prediction was checked, so the
    drafts it saved belong to the next round of the same request. Null (no pre-draft) counts as
    a miss. NOTE: no recorder writes pre-drafting rounds yet, so this reading is unchecked.
    """
    hit = np.asarray(table.column("predraft_hit").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    request = table.column("request_id").to_numpy(zero_copy_only=False)
    following = np.zeros(len(hit), dtype=bool)
    if len(hit) > 1:
        following[1:] = hit[:-1] & (request[1:] == request[:-1])
    return following
