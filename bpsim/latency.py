"""The latency model: what a round costs, fitted from the recorded draft_ms and verify_ms.

draft_ms(n)         = draft_overhead_ms + n * draft_ms_per_token            (0 when n = 0)
verify_ms(t, ctx)   = verify_base_ms + t * verify_ms_per_token + ctx * verify_ms_per_context
round_ms(n, ctx)    = draft_ms(n) + verify_ms(n + 1, ctx)

A speculative round with draft_len n verifies n + 1 tokens (the last accepted token and the n
drafts); plain target decoding is the n = 0 round. A coefficient that the traces cannot
identify (for example the per-token verify slope when every round used one draft_len) is set
by an explicit assumption that is listed in ``assumed`` and printed by ``describe``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bpsim.errors import BpsimError


class LatencyModelError(BpsimError, ValueError):
    """Timings from which no latency model can be fitted."""


@dataclass(frozen=True)
class LatencyModel:
    draft_ms_per_token: float
    verify_base_ms: float
    draft_overhead_ms: float = 0.0
    verify_ms_per_token: float = 0.0
    verify_ms_per_context: float = 0.0
    # Fraction of a pre-draft hidden behind the target's verification on a hit (1 = fully hidden).
    predraft_overlap: float = 1.0
    assumed: tuple[str, ...] = ()  # names of the fields set by assumption rather than fitted
    rounds: int = 0  # rounds the fit used

    def __post_init__(self):
        for name in ("draft_ms_per_token", "verify_base_ms", "draft_overhead_ms", "verify_ms_per_token",
                     "verify_ms_per_context"):
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
            f"  pre-draft overlap on a hit: {self.predraft_overlap:.2f}{mark('predraft_overlap')}",
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
        return cls(**data)

    @classmethod
    def fit(cls, draft_len, draft_ms, verify_ms, context_len=None, predraft_overlap: float | None = None
            ) -> "LatencyModel":
        """Least-squares fit of the model from per-round arrays (one entry per recorded round)."""
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
        assumed: list[str] = []

        # Draft: slope and intercept over rounds that drafted; one distinct draft_len leaves no intercept.
        drafted = draft_len > 0
        if not drafted.any():
            raise LatencyModelError("no round drafted any token (draft_len 0 everywhere); record a speculative trace")
        lengths = np.unique(draft_len[drafted])
        if len(lengths) > 1:
            slope, intercept = np.polyfit(draft_len[drafted], draft_ms[drafted], 1)
            draft_per_token, draft_overhead = max(slope, 1e-6), max(intercept, 0.0)
        else:
            draft_per_token, draft_overhead = float(np.median(draft_ms[drafted] / draft_len[drafted])), 0.0
            assumed.append("draft_overhead_ms")

        # Verify: base + per token + per context token; drop the columns the data cannot identify.
        tokens = draft_len + 1
        columns = [np.ones_like(tokens)]
        names = ["verify_base_ms"]
        if len(np.unique(tokens)) > 1:
            columns.append(tokens)
            names.append("verify_ms_per_token")
        else:
            assumed.append("verify_ms_per_token")
        if np.ptp(context) > 0:
            columns.append(context)
            names.append("verify_ms_per_context")
        else:
            assumed.append("verify_ms_per_context")
        coefficients, *_ = np.linalg.lstsq(np.stack(columns, axis=1), verify_ms, rcond=None)
        fitted = dict(zip(names, coefficients))
        # NOTE: with one verified length the whole verify cost sits in the base, as if verifying
        # k tokens cost the same as one; record at two draft_len values to fit the slope.
        if predraft_overlap is None:
            assumed.append("predraft_overlap")
            predraft_overlap = 1.0
        return cls(
            draft_ms_per_token=float(draft_per_token), draft_overhead_ms=float(draft_overhead),
            verify_base_ms=max(float(fitted["verify_base_ms"]), 0.0),
            verify_ms_per_token=max(float(fitted.get("verify_ms_per_token", 0.0)), 0.0),
            verify_ms_per_context=max(float(fitted.get("verify_ms_per_context", 0.0)), 0.0),
            predraft_overlap=float(predraft_overlap), assumed=tuple(assumed), rounds=len(draft_len),
        )


def fit_from_table(table) -> LatencyModel:
    """Fit a latency model from a trace table (pyarrow) with the standard trace columns."""
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in
               ("draft_len", "draft_ms", "verify_ms", "context_len")}
    return LatencyModel.fit(columns["draft_len"], columns["draft_ms"], columns["verify_ms"], columns["context_len"])
