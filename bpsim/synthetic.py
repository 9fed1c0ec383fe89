"""Synthetic trace tables from a known acceptance process, for tests and benchmarks.

Each drafted token is accepted with probability ``sigmoid(logit(rate) + confidence_strength * z)``.
Here ``rate`` is the acceptance rate of the round and ``z ~ N(0, 1)`` is a per-token latent that
also sets the token's ``draft_max_prob`` and ``draft_entropy``. With ``confidence_strength = 0``
the confidences carry no information and the acceptance rate is exactly ``rate``. A round's
``accepted`` count is the number of leading accepted drafts, so with one constant rate it follows
the capped geometric law P(k) = a^k (1 - a) for k < n, P(n) = a^n.

Over-dispersion: with ``request_concentration`` c each request draws its own rate from
Beta(a c, (1 - a) c); with ``round_concentration`` each round draws one again around that. The
per-round rate makes the accepted count beta-geometric (a beta mixture of capped geometrics).

Everything is drawn with numpy in whole arrays, so a million rounds take seconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bpsim.atomic import atomic_path

SCHEMA_VERSION = 1
METADATA_KEY = b"bpsim"  # schema-level metadata key whose value is the trace's JSON metadata
VOCAB_SIZE = 49152  # token ids are drawn below this (SmolLM2's vocabulary size)
ENTROPY_SPREAD = 20  # the non-max draft mass is spread over this many tokens for the entropy


@dataclass(frozen=True)
class SyntheticSpec:
    """The acceptance process, latencies and labels of one synthetic trace."""

    requests: int = 8
    rounds_per_request: int = 16
    draft_len: tuple[int, ...] = (4,)  # each round draws its draft_len uniformly from these
    acceptance: float = 0.7  # mean per-token acceptance rate
    request_concentration: float | None = None  # Beta concentration of per-request rates; None: no spread
    round_concentration: float | None = None  # Beta concentration of per-round rates; None: no spread
    confidence_strength: float = 0.0  # logit slope of acceptance on the latent behind draft_max_prob
    second_match_rate: float = 0.3  # probability that a correction equals the draft's second-best token
    draft_ms_per_token: float = 2.0
    draft_overhead_ms: float = 0.5
    verify_base_ms: float = 10.0
    verify_ms_per_token: float = 0.5
    verify_ms_per_context: float = 0.001
    latency_noise: float = 0.05  # log-normal sigma of multiplicative timing noise; 0 for exact timings
    prompt_len: int = 32
    seed: int = 0
    suite: str = "synthetic"
    mode: str = "greedy"  # sampling mode label stored in the metadata: greedy or sample
    target: str = "synthetic-target"
    draft: str = "synthetic-draft"
    run_id: str = "synthetic-0"

    def __post_init__(self):
        draft_len = (self.draft_len,) if isinstance(self.draft_len, int) else tuple(int(n) for n in self.draft_len)
        object.__setattr__(self, "draft_len", draft_len)
        if self.requests < 1 or self.rounds_per_request < 1:
            raise ValueError(f"requests and rounds_per_request must be >= 1, got {self.requests}, "
                             f"{self.rounds_per_request}")
        if not draft_len or min(draft_len) < 0 or max(draft_len) > 32767:
            raise ValueError(f"draft_len values must lie in 0..32767, got {draft_len}")
        for name in ("acceptance", "second_match_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("request_concentration", "round_concentration"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        if self.mode not in ("greedy", "sample"):
            raise ValueError(f"mode must be 'greedy' or 'sample', got {self.mode!r}")


def _logit(p):
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def _beta_around(rng, mean, concentration, size):
    """Draw rates with the given mean from Beta(mean c, (1 - mean) c); an exact mean of 0 or 1 stays put."""
    mean = np.broadcast_to(np.asarray(mean, dtype=float), size)
    if concentration is None:
        return mean.copy()
    inside = (mean > 0) & (mean < 1)
    rates = mean.copy()
    safe = np.where(inside, mean, 0.5)
    draws = rng.beta(safe * concentration, (1 - safe) * concentration)
    rates[inside] = draws[inside]
    return rates


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _ragged(matrix: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flatten the first ``lengths[i]`` entries of each row of ``matrix``, row by row."""
    columns = np.arange(matrix.shape[1])
    return matrix[columns[None, :] < lengths[:, None]]


def trace_metadata(spec: SyntheticSpec) -> dict:
    temperature = 0.0 if spec.mode == "greedy" else 1.0
    return {
        "schema_version": SCHEMA_VERSION,
        "target": {"name": spec.target, "sha256": f"synthetic-{spec.target}"},
        "draft": {"name": spec.draft, "sha256": f"synthetic-{spec.draft}"},
        "sampling": {"mode": spec.mode, "temperature": temperature, "top_k": 0, "top_p": 1.0},
        "policy": {"name": "fixed", "draft_len": list(spec.draft_len)},
        "suite": spec.suite,
        "synthetic": asdict(spec),
    }


def synthetic_trace(spec: SyntheticSpec | None = None, **overrides) -> pa.Table:
    """Generate one trace table with the standard per-round columns and the metadata under ``METADATA_KEY``.

    Keyword arguments override fields of ``spec`` (or of the default spec).
    """
    if spec is None:
        spec = SyntheticSpec(**overrides)
    elif overrides:
        spec = SyntheticSpec(**{**asdict(spec), **overrides})
    rng = np.random.default_rng(spec.seed)
    rounds = spec.requests * spec.rounds_per_request
    request = np.repeat(np.arange(spec.requests, dtype=np.int32), spec.rounds_per_request)  # (rounds,)
    round_index = np.tile(np.arange(spec.rounds_per_request, dtype=np.int32), spec.requests)

    # 1. Draft lengths and acceptance rates: per request, then per round.
    draft_len = rng.choice(np.asarray(spec.draft_len, dtype=np.int64), size=rounds)
    request_rate = _beta_around(rng, spec.acceptance, spec.request_concentration, spec.requests)
    round_rate = _beta_around(rng, request_rate[request], spec.round_concentration, rounds)

    # 2. Per-token latents, confidences and verdicts. Columns past draft_len are padding.
    width = max(int(draft_len.max()), 1)
    latent = rng.standard_normal((rounds, width))  # (rounds, width)
    token_prob = 1.0 / (1.0 + np.exp(-(_logit(round_rate)[:, None] + spec.confidence_strength * latent)))
    token_prob = np.where(np.isin(round_rate, (0.0, 1.0))[:, None], round_rate[:, None], token_prob)
    judged = np.arange(width)[None, :] < draft_len[:, None]
    verdict = (rng.random((rounds, width)) < token_prob) & judged
    accepted = np.cumprod(verdict, axis=1).sum(axis=1)  # leading accepted drafts
    max_prob = 1.0 / (1.0 + np.exp(-(1.0 + latent + 0.3 * rng.standard_normal((rounds, width)))))
    entropy = -max_prob * np.log(max_prob) - (1 - max_prob) * np.log((1 - max_prob) / ENTROPY_SPREAD)

    # 3. Positions: every round emits its accepted drafts plus one target token.
    emitted = accepted + 1
    start = np.cumsum(emitted) - emitted
    first_of_request = np.r_[0, np.cumsum(np.bincount(request, minlength=spec.requests))[:-1]]
    position = start - start[first_of_request][request]
    context_len = spec.prompt_len + position

    # 4. Timings: the latency model's means with log-normal noise, and no overlap between the two models.
    def noisy(mean):
        if spec.latency_noise == 0:
            return mean
        return mean * rng.lognormal(-spec.latency_noise ** 2 / 2, spec.latency_noise, size=rounds)

    draft_ms = noisy(np.where(draft_len > 0, spec.draft_overhead_ms + draft_len * spec.draft_ms_per_token, 0.0))
    verify_ms = noisy(spec.verify_base_ms + (draft_len + 1) * spec.verify_ms_per_token
                      + context_len * spec.verify_ms_per_context)

    # 5. Token ids: emitted tokens are the accepted drafts and then a fresh target token.
    draft_tokens = rng.integers(0, VOCAB_SIZE, size=(rounds, width), dtype=np.int32)
    second_tokens = (draft_tokens + 1 + rng.integers(0, VOCAB_SIZE - 1, size=(rounds, width), dtype=np.int32)
                     ) % VOCAB_SIZE
    target_token = rng.integers(0, VOCAB_SIZE, size=rounds, dtype=np.int32)
    rejected = np.take_along_axis(draft_tokens, np.minimum(accepted, width - 1)[:, None], axis=1)[:, 0]
    clash = (accepted < draft_len) & (target_token == rejected)
    target_token[clash] = (target_token[clash] + 1) % VOCAB_SIZE  # a correction differs from the rejected draft
    second_at_rejection = np.take_along_axis(second_tokens, np.minimum(accepted, width - 1)[:, None], axis=1)[:, 0]
    guessed = (accepted < draft_len) & (rng.random(rounds) < spec.second_match_rate)
    target_token[guessed] = second_at_rejection[guessed]
    emitted_tokens = np.concatenate([draft_tokens, np.zeros((rounds, 1), dtype=np.int32)], axis=1)
    emitted_tokens[np.arange(rounds), accepted] = target_token

    null_int = pa.nulls(rounds, type=pa.int16())
    columns = {
        "run_id": pa.array(np.full(rounds, spec.run_id, dtype=object), type=pa.string()),
        "request_id": pa.array(request, type=pa.int32()),
        "prompt_id": pa.array(np.char.add(f"{spec.suite}/", request.astype(str)).astype(object), type=pa.string()),
        "round": pa.array(round_index, type=pa.int32()),
        "position": pa.array(position, type=pa.int32()),
        "context_len": pa.array(context_len, type=pa.int32()),
        "draft_len": pa.array(draft_len, type=pa.int16()),
        "predicted": null_int,
        "predraft_hit": pa.nulls(rounds, type=pa.bool_()),
        "accepted": pa.array(accepted, type=pa.int16()),
        "emitted": pa.array(emitted, type=pa.int16()),
        "tokens": _list_array(_ragged(emitted_tokens, emitted), emitted, pa.int32()),
        "draft_tokens": _list_array(_ragged(draft_tokens, draft_len), draft_len, pa.int32()),
        "draft_second_tokens": _list_array(_ragged(second_tokens, draft_len), draft_len, pa.int32()),
        "draft_max_prob": _list_array(_ragged(max_prob.astype(np.float32), draft_len), draft_len, pa.float32()),
        "draft_entropy": _list_array(_ragged(entropy.astype(np.float32), draft_len), draft_len, pa.float32()),
        "draft_ms": pa.array(draft_ms, type=pa.float64()),
        "verify_ms": pa.array(verify_ms, type=pa.float64()),
        "predraft_ms": pa.nulls(rounds, type=pa.float64()),
        "round_ms": pa.array(draft_ms + verify_ms, type=pa.float64()),
        "finished": pa.array(round_index == spec.rounds_per_request - 1, type=pa.bool_()),
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(trace_metadata(spec)).encode()})


def table_metadata(table: pa.Table) -> dict:
    """Return the JSON metadata stored under ``METADATA_KEY``, or an empty dict."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def write_synthetic(path: Path | str, spec: SyntheticSpec | None = None, **overrides) -> Path:
    """Write ``synthetic_trace(spec, **overrides)`` to a Parquet file atomically and return its path."""
    table = synthetic_trace(spec, **overrides)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def capped_geometric_pmf(rate: float, draft_len: int) -> np.ndarray:
    """P(k) = rate^k (1 - rate) for k < draft_len and P(draft_len) = rate^draft_len; shape (draft_len + 1,)."""
    k = np.arange(draft_len + 1)
    pmf = rate ** k * (1 - rate)
    pmf[draft_len] = rate ** draft_len
    return pmf


def expected_accepted(rate: float, draft_len: int) -> float:
    """Mean of the capped geometric: sum_{k=1..n} rate^k."""
    if rate == 1.0:
        return float(draft_len)
    return rate * (1 - rate ** draft_len) / (1 - rate) if draft_len else 0.0


__all__ = ["SyntheticSpec", "synthetic_trace", "trace_metadata", "table_metadata", "write_synthetic", "capped_geometric_pmf",
           "expected_accepted", "METADATA_KEY", "SCHEMA_VERSION"]
