"""Replay decoding policies against recorded acceptances and a latency model, on tensors.

Every policy decodes the same requests, whose per-position outcomes come from
``bpsim.replay_data``: a round starting at output position s with draft_len n accepts
a = min(run[s], n) drafts, where run[s] counts the consecutive matches from s, and the target
then emits token s + a. Policies:

- ``target``: plain target decoding, draft_len 0 every round;
- ``plain``: speculative decoding with one fixed draft_len;
- ``predicted``: branch prediction. Once a round's drafts exist, the predictor returns the
  branch point and the next draft_len. The next round's drafts are pre-drafted from that
  branch point while the target verifies. The pre-draft is kept when the predicted count equals
  the accepted one and the guessed branch token is right: the draft's second-best token at a
  rejection (``second_match``), or its own next token after an all-accepted round (``match``).
- ``sequential``: as ``predicted``, but nothing is pre-drafted: the predictor only sets the next
  draft_len, which the next round drafts after the verdict. It is the right choice where a
  pre-draft beside verification costs more than it saves (a negative or small overlap);
- ``heuristic``: the +2/-1 draft-length schedule of transformers' assisted generation, set after
  each verdict (two more drafts after an all-accepted round, one fewer otherwise, within
  1..max), without pre-drafting;
- ``exhaustive``: as ``predicted``, but the pre-draft runs in one batch on the ``width`` branch
  points nearest the prediction (width 0 means all n + 1). It is kept when the accepted count is
  any of them, and its compute is ``LatencyModel.predraft_ms`` of the batch;
- ``oracle``: the ceiling. It knows every round's outcome, so each pre-draft is kept, and it
  picks the best draft_len of each round by dynamic programming over positions.

Time follows ``LatencyModel``: a round costs its own drafting (none when a kept pre-draft
already made its drafts), verification of n + 1 tokens at the current context length, and
``LatencyModel.predraft_cost_ms`` when it launches a pre-draft, kept or not. Rounds, requests and policy configurations are batch
dimensions: ``simulate`` steps every (configuration, request) lane one round at a time, so a
grid of predictor parameters over all requests costs one Python loop over rounds.

A round never drafts past the request's last token (n is capped at the tokens left minus one),
as a decoder that knows its token budget would; the cost of drafts a decoder would waste past an
end-of-sequence token is not counted. NOTE: bpsim's own decoders do not cap draft_len at
max_new_tokens, so their last rounds of a request draft a few tokens the replay leaves out.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from tqdm import tqdm

from bpsim.errors import BpsimError
from bpsim.jsonsafe import json_safe
from bpsim.latency import LatencyModel
from bpsim.predictors.base import Predictor
from bpsim.replay_data import AcceptanceTable, ReplayBatch, realize
from bpsim.replay_steppers import (LaneStepper, StepFeatures, build_stepper, first_draft_len, max_draft_len_of,
                                   state_entries_per_lane, stepper_group_key)

logger = logging.getLogger(__name__)

DEFAULT_DRAFT_LENS = tuple(range(1, 9))
DEFAULT_SAMPLES = 16  # draws per request when the outcomes are probabilities
DEFAULT_BOOTSTRAP = 1000
ACTIVE_CHECK_EVERY = 16  # rounds between host-side checks that some lane is still decoding
# Intra-op threads of a CPU replay. Its per-round tensors are small, and on a 2-core machine
# shared with a busy process torch 2.13's two-thread kernels took milliseconds per call where
# one thread took microseconds (analysis/bench_replay.py, docs/replay-benchmark.md).
DEFAULT_CPU_THREADS = 1
MAX_LANE_STATE = 1 << 24  # float64 values of predictor state held at once before lanes run in chunks


class ReplayError(BpsimError, ValueError):
    """Replay settings that cannot be simulated."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``auto`` to CUDA when available, else CPU; reject ``cuda`` on a machine without it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReplayError("--device cuda was requested but torch finds no CUDA device; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ReplayError(f"device {device} is not supported; use auto, cpu or cuda")
    return device


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)`` and restore the previous count after."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ReplayError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Costs:
    """``LatencyModel`` on tensors; each method mirrors the model's numpy method of the same name."""

    def __init__(self, model: LatencyModel):
        self.model = model

    def draft_ms(self, n: torch.Tensor) -> torch.Tensor:
        m = self.model
        return torch.where(n > 0, m.draft_overhead_ms + n.double() * m.draft_ms_per_token,
                           torch.zeros_like(n, dtype=torch.float64))

    def verify_ms(self, tokens: torch.Tensor, context_len: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.verify_base_ms + tokens.double() * m.verify_ms_per_token + context_len.double() * m.verify_ms_per_context

    def predraft_ms(self, n: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
        return self.draft_ms(n) * (1.0 + (branches.double() - 1.0) * self.model.branch_batch_cost)

    def predraft_cost_ms(self, n: torch.Tensor, window_ms: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
        compute = self.predraft_ms(n, branches)
        hidden = self.model.predraft_overlap * torch.minimum(compute, window_ms)
        return torch.where(n > 0, compute - hidden + self.model.predraft_overhead_ms, torch.zeros_like(compute))


@dataclass
class LaneTotals:
    """Per-lane sums of one simulation, numpy arrays of shape (lanes,)."""

    time_ms: np.ndarray
    tokens: np.ndarray
    rounds: np.ndarray
    drafted: np.ndarray  # drafts verified by the target
    rejected: np.ndarray  # verified drafts that were not accepted
    predrafts: np.ndarray  # pre-drafts launched
    hits: np.ndarray  # pre-drafts kept
    discarded: np.ndarray  # pre-drafted tokens thrown away (missed pre-drafts, other branches)
    predicted_rounds: np.ndarray  # rounds with drafts in which the predictor guessed
    correct_branch: np.ndarray  # of those, rounds where predicted == accepted
    over_depth: np.ndarray  # bool: the lane asked for more drafts than its request has tokens
    max_draft_len: int = 0  # largest draft_len any round used
    record: dict | None = None  # per-round tensors (rounds, lanes) when ``record=True``


def _features(batch: ReplayBatch, row: torch.Tensor, pos: torch.Tensor, n: torch.Tensor, ctx: torch.Tensor,
              stepper: LaneStepper) -> StepFeatures:
    if not stepper.needs_features:
        return StepFeatures(n, pos, ctx)
    # A fixed width (the stepper's largest draft_len) keeps the device from syncing on n.max().
    width = max(stepper.draft_len_bound, 1)
    offsets = torch.arange(width, device=pos.device)[None, :]
    column = torch.clamp(pos[:, None] + offsets, max=batch.width - 1)  # (lanes, width)
    flat = row[:, None] * batch.width + column  # torch.take on a flat index gathers faster than [row, column]
    inside = offsets < n[:, None]
    nan = torch.tensor(float("nan"), device=pos.device)
    probs = torch.where(inside, torch.take(batch.draft_max_prob, flat), nan)
    entropy = torch.where(inside, torch.take(batch.draft_entropy, flat), nan)
    return StepFeatures(n, pos, ctx, probs, entropy)


def simulate(batch: ReplayBatch, latency: LatencyModel, configs: int, *, draft_lens=None,
             stepper: LaneStepper | None = None, first_draft_lens=None, widths=None, predrafting=None,
             heuristic_max=None, record: bool = False) -> LaneTotals:
    """Step ``configs x batch.rows`` lanes (config-major) round by round until every request ends.

    Plain policies give ``draft_lens`` (configs,); branch-predicted ones give a ``stepper`` and
    ``first_draft_lens`` (configs,) or (lanes,), plus ``widths`` (configs,) for the exhaustive
    strategy (1 = one branch point, 0 = all of them) and ``predrafting`` (configs,) bool, False for
    configurations that only set draft lengths and never pre-draft (default True). With
    ``heuristic_max`` (configs,), plain lanes start at ``draft_lens`` and follow the +2/-1 schedule
    capped at that maximum.
    """
    if (draft_lens is None) == (stepper is None):
        raise ValueError("pass either draft_lens (plain policies) or a stepper (predicted policies)")
    device = batch.match.device
    costs = Costs(latency)
    rows, width = batch.rows, batch.width
    lanes = configs * rows
    lane = torch.arange(lanes, device=device)
    row = lane % rows  # (lanes,)
    length, prompt = batch.length[row], batch.prompt_len[row]
    offset = row * width
    run, match, second = batch.run.reshape(-1), batch.match.reshape(-1), batch.second_match.reshape(-1)

    def per_lane(values) -> torch.Tensor:
        values = torch.as_tensor(values, device=device, dtype=torch.long)
        return values if values.numel() == lanes else values.repeat_interleave(rows)

    next_len = per_lane(draft_lens if stepper is None else first_draft_lens)
    branches_setting = per_lane(widths) if widths is not None else torch.ones(lanes, dtype=torch.long, device=device)
    allowed = (per_lane([bool(flag) for flag in predrafting]).bool() if predrafting is not None
               else torch.ones(lanes, dtype=torch.bool, device=device))
    rule_max = per_lane(heuristic_max) if heuristic_max is not None else None
    zeros_f = torch.zeros(lanes, dtype=torch.float64, device=device)
    zeros_i = torch.zeros(lanes, dtype=torch.long, device=device)
    pos = zeros_i.clone()
    ready = torch.zeros(lanes, dtype=torch.bool, device=device)  # this round's drafts came from a kept pre-draft
    time_ms = zeros_f.clone()
    counts = {name: zeros_i.clone() for name in ("rounds", "drafted", "rejected", "predrafts", "hits", "discarded",
                                                  "predicted_rounds", "correct_branch")}
    over_depth = torch.zeros(lanes, dtype=torch.bool, device=device)
    max_used = torch.zeros((), dtype=torch.long, device=device)
    steps: dict[str, list] = {}

    for step in range(int(batch.length.max())):
        active = pos < length
        if step % ACTIVE_CHECK_EVERY == 0 and not bool(active.any()):
            break
        # 1. This round's drafts: as many as requested, never past the request's last token.
        over_depth |= active & (next_len > length - 1)
        n = torch.where(active, torch.clamp(torch.minimum(next_len, length - pos - 1), min=0), zeros_i)
        max_used = torch.maximum(max_used, n.max())
        index = offset + pos
        accepted = torch.minimum(run[index], n)
        ctx = prompt + pos
        verify = costs.verify_ms(n + 1, ctx)
        round_ms = torch.where(ready, zeros_f, costs.draft_ms(n)) + verify
        next_pos = pos + accepted + 1
        continues = active & (next_pos < length)

        # 2. Predict before the verdict, pre-draft from the predicted branch point, then check.
        if stepper is not None:
            predicted, proposed = stepper.predict(_features(batch, row, pos, n, ctx, stepper))
            predicted = torch.clamp(torch.minimum(predicted, n), min=0)
            proposed = torch.clamp(proposed, min=0)
            branches = torch.where(branches_setting == 0, n + 1, torch.minimum(branches_setting, n + 1))
            first_branch = torch.clamp(torch.minimum(predicted - (branches - 1) // 2, n + 1 - branches), min=0)
            covered = (accepted >= first_branch) & (accepted < first_branch + branches)
            token_right = torch.where(accepted < n, second[index + accepted], match[index + n])
            # Like the round's own drafts, a pre-draft never runs past the request's last token.
            pre_len = torch.clamp(torch.minimum(proposed, length - next_pos - 1), min=0)
            predraft = continues & (pre_len > 0) & allowed
            hit = predraft & covered & token_right
            round_ms = round_ms + torch.where(predraft, costs.predraft_cost_ms(pre_len, verify, branches), zeros_f)
            ready = hit
            used = torch.where(hit, pre_len, zeros_i)
            counts["predrafts"] += predraft
            counts["hits"] += hit
            counts["discarded"] += torch.where(predraft, branches * pre_len, zeros_i) - used
            guessed = active & (n > 0)
            counts["predicted_rounds"] += guessed
            counts["correct_branch"] += guessed & (predicted == accepted)
            stepper.update(accepted, n, active)
            next_len = torch.where(active, proposed, next_len)
            if record:
                for name, value in (("predicted", predicted), ("next_draft_len", proposed), ("hit", hit)):
                    steps.setdefault(name, []).append(value.clone())

        elif rule_max is not None:
            # The +2/-1 schedule reads this round's verdict; it never pre-drafts.
            grown = torch.where(accepted >= n, n + 2, n - 1)
            next_len = torch.where(active, torch.clamp(torch.minimum(grown, rule_max), min=1), next_len)

        time_ms += torch.where(active, round_ms, zeros_f)
        counts["rounds"] += active
        counts["drafted"] += n
        counts["rejected"] += n - accepted
        if record:
            for name, value in (("active", active), ("position", pos), ("draft_len", n), ("accepted", accepted),
                                ("round_ms", torch.where(active, round_ms, zeros_f))):
                steps.setdefault(name, []).append(value.clone())
        pos = torch.where(active, next_pos, pos)

    return LaneTotals(
        time_ms=time_ms.cpu().numpy(), tokens=length.cpu().numpy(),
        **{name: value.cpu().numpy() for name, value in counts.items()}, over_depth=over_depth.cpu().numpy(),
        max_draft_len=int(max_used), record={name: torch.stack(values).cpu() for name, values in steps.items()}
        if record else None)


def simulate_oracle(batch: ReplayBatch, latency: LatencyModel, max_draft_len: int) -> LaneTotals:
    """Simulate the ceiling: every pre-draft kept and each round's draft_len chosen with hindsight, (rows,) lanes.

    T[s, k] is the least time to finish a request from position s when the previous round drafted
    k tokens. The options are every draft_len n <= ``max_draft_len``. This round's drafts are
    either pre-drafted during the previous round (kept for sure) or drafted now, whichever is
    cheaper. The pre-draft window uses the context length at s, slightly above the previous
    round's, so T can only be optimistic and the oracle stays a ceiling for every policy drafting
    at most ``max_draft_len`` tokens.
    """
    device = batch.match.device
    costs = Costs(latency)
    rows, width = batch.rows, batch.width
    options = max_draft_len + 1
    row = torch.arange(rows, device=device)
    choice_n = torch.arange(options, device=device)  # (options,)
    best = torch.zeros((rows, width + 1, options), dtype=torch.float64, device=device)  # T[s, k]; 0 past the end
    choice = torch.zeros((rows, width, options), dtype=torch.int16, device=device)
    first_choice = torch.zeros((rows, width), dtype=torch.int16, device=device)

    for s in range(width - 1, -1, -1):
        inside = s < batch.length  # (rows,)
        if not bool(inside.any()):
            continue
        left = torch.clamp(batch.length - s - 1, min=0)  # (rows,)
        n = torch.minimum(choice_n[None, :], left[:, None])  # (rows, options)
        accepted = torch.minimum(batch.run[:, s][:, None], n)
        ctx = (batch.prompt_len + s)[:, None]
        verify = costs.verify_ms(n + 1, ctx)  # (rows, options)
        following = torch.clamp(s + accepted + 1, max=width)  # (rows, options)
        after = torch.take(best, (row[:, None] * (width + 1) + following) * options + n)  # T[s + a + 1, n]
        own = costs.draft_ms(n)  # (rows, options)
        # Previous round drafted k: its verification window hides part of this round's drafting.
        window = costs.verify_ms(choice_n[None, :, None] + 1, ctx[:, :, None])  # (rows, k, 1)
        predrafted = costs.predraft_cost_ms(n[:, None, :], window, torch.ones_like(n[:, None, :]))
        draft_cost = torch.where(n[:, None, :] > 0, torch.minimum(own[:, None, :], predrafted), 0.0)  # (rows, k, n)
        total = draft_cost + (verify + after)[:, None, :]
        # amin and argmin, not min(dim=2): torch's CPU min with indices can stall for ~15 ms a call
        # when another process keeps the cores busy (seen with torch 2.13 on two threads).
        value, argmin = total.amin(dim=2), total.argmin(dim=2)  # (rows, k)
        best[:, s] = torch.where(inside[:, None], value, 0.0)
        choice[:, s] = argmin.to(torch.int16)
        first_choice[:, s] = torch.argmin(own + verify + after, dim=1).to(torch.int16)

    # Forward pass along the chosen rounds for the counts.
    pos = torch.zeros(rows, dtype=torch.long, device=device)
    previous = torch.full((rows,), -1, dtype=torch.long, device=device)
    time_ms = torch.zeros(rows, dtype=torch.float64, device=device)
    counts = {name: torch.zeros(rows, dtype=torch.long, device=device) for name in ("rounds", "drafted", "predrafts")}
    for _ in range(width):
        active = pos < batch.length
        if not bool(active.any()):
            break
        safe_pos = torch.clamp(pos, max=width - 1)
        n_first = first_choice[row, safe_pos].long()
        n_later = choice[row, safe_pos, torch.clamp(previous, min=0)].long()
        n = torch.where(previous < 0, n_first, n_later)
        n = torch.where(active, torch.minimum(n, torch.clamp(batch.length - pos - 1, min=0)), torch.zeros_like(n))
        accepted = torch.minimum(batch.run[row, safe_pos], n)
        ctx = batch.prompt_len + pos
        verify = costs.verify_ms(n + 1, ctx)
        own = costs.draft_ms(n)
        window = costs.verify_ms(torch.clamp(previous, min=0) + 1, ctx)
        predrafted = costs.predraft_cost_ms(n, window, torch.ones_like(n))
        use_predraft = (previous >= 0) & (n > 0) & (predrafted < own)
        draft_cost = torch.where(use_predraft, predrafted, own)
        time_ms += torch.where(active, draft_cost + verify, 0.0)
        counts["rounds"] += active
        counts["drafted"] += n
        counts["predrafts"] += active & use_predraft
        previous = torch.where(active, n, previous)
        pos = torch.where(active, pos + accepted + 1, pos)

    zeros = np.zeros(rows, dtype=np.int64)
    predrafts = counts["predrafts"].cpu().numpy()
    return LaneTotals(time_ms=time_ms.cpu().numpy(), tokens=batch.length.cpu().numpy(),
                      rounds=counts["rounds"].cpu().numpy(), drafted=counts["drafted"].cpu().numpy(), rejected=zeros,
                      predrafts=predrafts, hits=predrafts, discarded=zeros, predicted_rounds=zeros,
                      correct_branch=zeros, over_depth=np.zeros(rows, dtype=bool), max_draft_len=max_draft_len)


# ---------------------------------------------------------------------------------------------
# Policies, results and the replay entry point


def predictor_label(predictor: Predictor) -> str:
    """Return ``family:k=v,...`` with the scalar parameters that differ from the family's defaults.

    The form is the CLI's ``--predictor`` syntax.
    """
    defaults = {}
    for cls in reversed(type(predictor).__mro__):  # subclasses pass shared parameters up through **kwargs
        if "__init__" in cls.__dict__:
            defaults.update({name: parameter.default for name, parameter in
                             inspect.signature(cls.__init__).parameters.items()
                             if parameter.default is not inspect.Parameter.empty})
    scalars = [f"{key}={value}" for key, value in predictor.params().items()
               if isinstance(value, (int, float, str)) and defaults.get(key, inspect.Parameter.empty) != value]
    return predictor.family + (":" + ",".join(scalars) if scalars else "")


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap interval over requests."""

    value: float
    low: float
    high: float

    def format(self, digits: int = 2) -> str:
        if not math.isfinite(self.value):
            return "-"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass
class PolicyResult:
    """Replayed speed of one policy over every request."""

    name: str
    kind: str  # target, plain, predicted, exhaustive or oracle
    tokens_per_s: Interval
    speedup_vs_target: Interval
    speedup_vs_best_plain: Interval
    hit_rate: Interval | None  # kept pre-drafts / pre-drafts launched
    branch_accuracy: Interval | None  # rounds with drafts where predicted == accepted
    wasted_per_token: float  # rejected drafts plus discarded pre-drafted tokens, per output token
    rounds: int
    tokens: int
    time_s: float
    predrafts: int
    hits: int
    approximate: bool
    config: dict | None = None  # the predictor's to_config(), for predicted and exhaustive policies
    draft_len: int | None = None  # plain policies: the draft_len; predicted ones: the first round's
    width: int | None = None  # exhaustive: branch points per pre-draft (0 = all)
    totals: LaneTotals | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "totals"}
        for name in ("tokens_per_s", "speedup_vs_target", "speedup_vs_best_plain", "hit_rate", "branch_accuracy"):
            if data[name] is not None:
                data[name] = asdict(data[name])
        return data


@dataclass
class ReplayResult:
    """Every policy's replayed speed on one set of requests, with the latency model and labels."""

    policies: list[PolicyResult]
    latency: LatencyModel
    exact: bool
    approximation: str  # why the replay is approximate; empty when exact
    warnings: list[str]
    requests: int
    samples: int
    tokens: int
    best_plain_draft_len: int  # 0 when target-only decoding beats every plain setting
    device: str
    seconds: float
    confidence: float
    sources: tuple[str, ...] = ()

    def policy(self, name: str) -> PolicyResult:
        for result in self.policies:
            if result.name == name:
                return result
        raise KeyError(f"no policy named {name!r}; replayed: {', '.join(p.name for p in self.policies)}")

    @property
    def mode(self) -> str:
        return "exact (greedy profile)" if self.exact else f"APPROXIMATE: {self.approximation}"

    def to_dict(self) -> dict:
        """Return a JSON-safe dict; undefined statistics (NaN) become None."""
        return json_safe({
            "mode": "exact" if self.exact else "approximate", "approximation": self.approximation,
            "warnings": self.warnings, "requests": self.requests, "samples": self.samples, "tokens": self.tokens,
            "best_plain_draft_len": self.best_plain_draft_len, "device": self.device, "seconds": self.seconds,
            "confidence": self.confidence, "sources": list(self.sources), "latency": self.latency.to_dict(),
            "policies": [policy.to_dict() for policy in self.policies],
        })

    def format_table(self) -> str:
        """Return a plain-text table of every policy, with the mode and warnings above it."""
        header = ["policy", "tokens/s", "vs target", "vs best plain", "hit rate", "wasted/token"]
        lines = [[p.name + (" (approx.)" if p.approximate and self.exact else ""), p.tokens_per_s.format(1),
                  p.speedup_vs_target.format(), p.speedup_vs_best_plain.format(),
                  p.hit_rate.format() if p.hit_rate else "-", f"{p.wasted_per_token:.2f}"]
                 for p in self.policies]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        out = [f"replay: {self.mode}; {self.requests} requests x {self.samples} draw(s), {self.tokens} tokens, "
               f"{self.confidence:.0%} bootstrap intervals over requests; best plain draft_len "
               f"{self.best_plain_draft_len}"]
        out += [f"warning: {warning}" for warning in self.warnings]
        for row in [header, *lines]:
            out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        return "\n".join(out)

    def to_markdown(self) -> str:
        lines = ["# Replay\n", f"- Mode: **{self.mode}**",
                 f"- Requests: {self.requests} ({self.samples} draw(s) each), {self.tokens} output tokens",
                 f"- Best plain speculative draft_len: {self.best_plain_draft_len} (0 = target alone)",
                 f"- Intervals: {self.confidence:.0%} bootstrap over requests",
                 f"- Device: {self.device}, {self.seconds:.2f} s",
                 f"- Sources: {', '.join(self.sources) or '-'}"]
        lines += [f"- Warning: {warning}" for warning in self.warnings]
        lines += ["", "## Latency model", "", "```", self.latency.describe(), "```", "", "## Policies", "",
                  "| policy | tokens/s | vs target | vs best plain | hit rate | branch accuracy | wasted/token |",
                  "|---|---|---|---|---|---|---|"]
        for p in self.policies:
            name = p.name + (" (approximate)" if p.approximate and self.exact else "")
            lines.append(f"| `{name}` | {p.tokens_per_s.format(1)} | {p.speedup_vs_target.format()} | "
                         f"{p.speedup_vs_best_plain.format()} | {p.hit_rate.format() if p.hit_rate else '-'} | "
                         f"{p.branch_accuracy.format() if p.branch_accuracy else '-'} | {p.wasted_per_token:.2f} |")
        return "\n".join(lines) + "\n"


@dataclass
class _Run:
    name: str
    kind: str
    totals: LaneTotals
    config: dict | None = None
    draft_len: int | None = None
    width: int | None = None


def _split_lanes(totals: LaneTotals, configs: int) -> list[LaneTotals]:
    """Cut config-major lane totals into one LaneTotals per config."""
    out = []
    for config in range(configs):
        part = {}
        for name in ("time_ms", "tokens", "rounds", "drafted", "rejected", "predrafts", "hits", "discarded",
                     "predicted_rounds", "correct_branch", "over_depth"):
            values = getattr(totals, name)
            rows = len(values) // configs
            part[name] = values[config * rows:(config + 1) * rows]
        out.append(LaneTotals(**part, max_draft_len=totals.max_draft_len))
    return out


def _concat_rows(parts: list[LaneTotals]) -> LaneTotals:
    names = ("time_ms", "tokens", "rounds", "drafted", "rejected", "predrafts", "hits", "discarded",
             "predicted_rounds", "correct_branch", "over_depth")
    return LaneTotals(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in names},
                      max_draft_len=max(p.max_draft_len for p in parts))


def _slice_batch(batch: ReplayBatch, start: int, stop: int) -> ReplayBatch:
    return ReplayBatch(match=batch.match[start:stop], second_match=batch.second_match[start:stop],
                       run=batch.run[start:stop], length=batch.length[start:stop],
                       prompt_len=batch.prompt_len[start:stop], draft_max_prob=batch.draft_max_prob[start:stop],
                       draft_entropy=batch.draft_entropy[start:stop], group=batch.group[start:stop],
                       samples=batch.samples)


def _simulate_predictors(batch: ReplayBatch, latency: LatencyModel, predictors: list[Predictor], widths: list[int],
                         first_lens: list[int] | None, grid_max: int, vectorised: bool,
                         predrafting: list[bool] | None = None) -> list[LaneTotals]:
    """Simulate same-group predictors (one entry per policy), chunking lanes to bound the stepper's state."""
    max_len = max(max_draft_len_of(p, grid_max) for p in predictors)
    prompts = batch.prompt_len.cpu().numpy()
    context_start, context_stop = int(prompts.min()), int(prompts.max() + batch.length.max()) + 1
    per_lane = max(state_entries_per_lane(p) for p in predictors)
    if vectorised and per_lane > MAX_LANE_STATE:
        # A pattern table this large does not fit even one lane densely; the scalar path stores
        # only the patterns a request visits.
        logger.warning("%s keeps %d state values per lane, more than %d; stepping it one lane at a time",
                       predictors[0].family, per_lane, MAX_LANE_STATE)
        vectorised, per_lane = False, 1
    lanes_per_chunk = max(1, MAX_LANE_STATE // per_lane)
    row_chunk = min(batch.rows, lanes_per_chunk)
    config_chunk = max(1, lanes_per_chunk // row_chunk)
    results: list[LaneTotals] = []
    for config_start in range(0, len(predictors), config_chunk):
        chunk = predictors[config_start:config_start + config_chunk]
        chunk_widths = widths[config_start:config_start + config_chunk]
        chunk_flags = None if predrafting is None else predrafting[config_start:config_start + config_chunk]
        row_parts = []
        for row_start in range(0, batch.rows, row_chunk):
            part = _slice_batch(batch, row_start, min(row_start + row_chunk, batch.rows))
            stepper = build_stepper(chunk, part.rows, batch.match.device, max_draft_len=max_len,
                                    context_start=context_start, context_stop=context_stop, vectorised=vectorised)
            if first_lens is not None:
                first = torch.tensor([first_lens[config_start + i] for i in range(len(chunk))]).repeat_interleave(part.rows)
            else:
                first = _first_lens(chunk, part)
            totals = simulate(part, latency, len(chunk), stepper=stepper, first_draft_lens=first, widths=chunk_widths,
                              predrafting=chunk_flags)
            row_parts.append(_split_lanes(totals, len(chunk)))
        for config in range(len(chunk)):
            results.append(_concat_rows([parts[config] for parts in row_parts]))
    return results


def _first_lens(predictors: list[Predictor], batch: ReplayBatch) -> torch.Tensor:
    """First-round draft lengths per lane, config-major, from each predictor at each prompt length."""
    prompts = batch.prompt_len.cpu().numpy()
    distinct, inverse = np.unique(prompts, return_inverse=True)
    values = []
    for predictor in predictors:
        by_prompt = np.array([first_draft_len(predictor, int(c)) for c in distinct], dtype=np.int64)
        values.append(by_prompt[inverse])
    return torch.from_numpy(np.concatenate(values))


def replay(table: AcceptanceTable, predictors=(), *, latency: LatencyModel | None = None,
           draft_lens=DEFAULT_DRAFT_LENS, exhaustive_widths=(), sequential: bool = False,
           heuristic: tuple[int, int] | None = None, first_draft_len: int | None = None,
           oracle: bool = True, device: str | torch.device = "auto", samples: int | None = None,
           bootstrap: int = DEFAULT_BOOTSTRAP, confidence: float = 0.95, seed: int = 0,
           vectorised: bool = True, threads: int | None = None, progress: bool = False) -> ReplayResult:
    """Replay target-only, plain speculative decoding at each of ``draft_lens``, every predictor, the
    exhaustive strategy at each of ``exhaustive_widths`` for every predictor, with ``sequential``
    every predictor once more without pre-drafting, with ``heuristic = (first, max)`` the +2/-1
    schedule, and the oracle.

    ``latency`` defaults to the model fitted from the table's traces. ``first_draft_len`` sets
    the first round of every predicted policy (default: each predictor's own, see
    ``replay_steppers.first_draft_len``). ``samples`` draws per request apply when outcomes are
    probabilities (default 16; exact tables use 1). Intervals come from ``bootstrap`` resamples of
    whole requests. ``vectorised=False`` steps predictors one lane at a time (for checking).
    ``threads`` sets torch's intra-op threads for a CPU replay (default ``DEFAULT_CPU_THREADS``).
    ``progress`` shows a progress bar over the simulation groups.
    """
    device = resolve_device(device)
    if threads is None and device.type == "cpu":
        threads = DEFAULT_CPU_THREADS
    with intra_op_threads(threads):
        return _replay(table, predictors, latency=latency, draft_lens=draft_lens, exhaustive_widths=exhaustive_widths,
                       sequential=sequential, heuristic=heuristic, first_draft_len=first_draft_len, oracle=oracle, device=device, samples=samples,
                       bootstrap=bootstrap, confidence=confidence, seed=seed, vectorised=vectorised,
                       progress=progress)


def _replay(table, predictors, *, latency, draft_lens, exhaustive_widths, sequential, heuristic, first_draft_len,
            oracle, device, samples,
            bootstrap, confidence, seed, vectorised, progress) -> ReplayResult:
    started = time.perf_counter()
    latency = latency or table.latency
    if latency is None:
        raise ReplayError("no latency model: the inputs carry no timings; pass one (--latency FILE)")
    draft_lens = sorted({int(n) for n in draft_lens})
    if not draft_lens or draft_lens[0] < 1:
        raise ReplayError(f"draft_lens must be integers >= 1 (target-only decoding is always replayed), got {draft_lens}")
    for width in exhaustive_widths:
        if int(width) < 0:
            raise ReplayError(f"exhaustive widths must be >= 1, or 0 for every branch point; got {width}")
    if not 0 < confidence < 1:
        raise ReplayError(f"confidence must lie in (0, 1), got {confidence}")
    samples = samples or (1 if table.exact else DEFAULT_SAMPLES)
    batch = realize(table, samples=samples, seed=seed, device=device)
    predictors = list(predictors)
    runs: list[_Run] = []
    # (predictor, width, pre-drafts): width 1 is one branch point, 0 all of them.
    jobs = [(predictor, 1, True) for predictor in predictors]
    jobs += [(predictor, int(width), True) for width in exhaustive_widths for predictor in predictors]
    if sequential:
        jobs += [(for_mode(predictor, False), 1, False) for predictor in predictors]
    groups: dict[tuple, list[int]] = {}
    for index, (predictor, _, _) in enumerate(jobs):
        groups.setdefault(stepper_group_key(predictor), []).append(index)
    bar = tqdm(total=1 + len(groups) + int(oracle), desc="replay", unit="group", disable=not progress)

    # 1. Target-only and plain speculative decoding: one lane per (draft_len, row).
    plain_lens = [0, *draft_lens]
    plain = simulate(batch, latency, len(plain_lens), draft_lens=plain_lens)
    bar.update()
    for n, totals in zip(plain_lens, _split_lanes(plain, len(plain_lens))):
        runs.append(_Run("target" if n == 0 else f"plain:draft_len={n}", "target" if n == 0 else "plain", totals,
                         draft_len=n))
    if heuristic is not None:
        first, maximum = (int(v) for v in heuristic)
        if not 1 <= first <= maximum:
            raise ReplayError(f"the +2/-1 schedule needs 1 <= first <= max draft_len, got {first} and {maximum}")
        totals = simulate(batch, latency, 1, draft_lens=[first], heuristic_max=[maximum])
        runs.append(_Run(f"plus2-minus1-rule:first={first},max={maximum}", "heuristic", totals, draft_len=first))

    # 2. Predictors (single branch and exhaustive), grouped so that one stepper steps each group.
    job_totals: dict[int, LaneTotals] = {}
    for indices in groups.values():
        members = [jobs[i][0] for i in indices]
        widths = [jobs[i][1] for i in indices]
        flags = [jobs[i][2] for i in indices]
        first = [first_draft_len] * len(members) if first_draft_len is not None else None
        grid_max = max(max(draft_lens), first_draft_len or 0)
        for index, totals in zip(indices, _simulate_predictors(batch, latency, members, widths, first, grid_max,
                                                                vectorised, flags)):
            job_totals[index] = totals
        bar.update()
    for index, (predictor, width, predrafts) in enumerate(jobs):
        label = predictor_label(predictor)
        totals = job_totals[index]
        first = first_draft_len if first_draft_len is not None else first_draft_len_summary(predictor, table)
        if not predrafts:
            runs.append(_Run(f"sequential:{label}", "sequential", totals, predictor.to_config(), first))
        elif width == 1:
            runs.append(_Run(label, "predicted", totals, predictor.to_config(), first))
        else:
            runs.append(_Run(f"exhaustive:width={width or 'all'}+{label}", "exhaustive", totals,
                             predictor.to_config(), first, width))

    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}#{seen[run.name]}"

    # 3. The oracle, over every draft_len any policy used.
    if oracle:
        ceiling = max([max(draft_lens)] + [run.totals.max_draft_len for run in runs])
        runs.append(_Run(f"oracle:max_draft_len={ceiling}", "oracle", simulate_oracle(batch, latency, ceiling)))
        bar.update()
    bar.close()

    warnings = []
    for run in runs:
        short = int(run.totals.over_depth.sum())
        if short:
            warnings.append(f"{run.name}: asked for more drafts than {short} of {batch.rows} request draws have "
                            f"tokens (shortest request {int(table.length.min())} tokens); those rounds were capped "
                            "at the request's end, so this policy's figures are approximate")
    for warning in warnings:
        logger.warning("%s", warning)
    results, best_plain = _summarise(runs, batch, table.requests, bootstrap, confidence, seed, table.exact)
    return ReplayResult(
        policies=results, latency=latency, exact=table.exact, approximation=table.approximation, warnings=warnings,
        requests=table.requests, samples=samples, tokens=int(table.length.sum()),
        best_plain_draft_len=best_plain, device=str(device), seconds=time.perf_counter() - started,
        confidence=confidence, sources=table.sources)


def for_mode(predictor: Predictor, predraft: bool) -> Predictor:
    """Return the predictor as it chooses draft lengths for a decoder that pre-drafts or does not.

    Distribution families weigh the pre-draft's cost and hits into each draft_len's speed, so they
    are rebuilt with that ``predraft``; the other families choose the same lengths either way.
    """
    from bpsim.predictors.base import predictor_from_config
    from bpsim.predictors.distribution import DistributionPredictor

    if not isinstance(predictor, DistributionPredictor) or predictor.predraft == predraft:
        return predictor
    config = predictor.to_config()
    params = {key: value for key, value in config["params"].items() if key != "predraft"}
    return predictor_from_config({**config, "params": {**params, **({} if predraft else {"predraft": False})}})



def first_draft_len_summary(predictor: Predictor, table: AcceptanceTable) -> int:
    """Return the first-round draft_len at the table's most common prompt length (for reporting)."""
    values, counts = np.unique(table.prompt_len, return_counts=True)
    return first_draft_len(predictor, int(values[np.argmax(counts)]))


def _summarise(runs: list[_Run], batch: ReplayBatch, groups: int, bootstrap: int, confidence: float, seed: int,
               exact: bool) -> tuple[list[PolicyResult], int]:
    """Turn lane totals into policy results with bootstrap intervals over requests (all draws of one request together)."""
    group = batch.group.cpu().numpy()

    def by_group(values) -> np.ndarray:
        return np.bincount(group, weights=np.asarray(values, dtype=np.float64), minlength=groups)

    fields = ("time_ms", "tokens", "predrafts", "hits", "predicted_rounds", "correct_branch")
    sums = {name: np.stack([by_group(getattr(run.totals, name)) for run in runs]) for name in fields}  # (runs, groups)
    generator = np.random.default_rng(seed + 1)
    weights = generator.multinomial(groups, np.full(groups, 1.0 / groups), size=bootstrap).astype(np.float64)
    weights = np.vstack([np.ones(groups), weights])  # row 0 is the full sample

    def resampled(name):
        return weights @ sums[name].T  # (1 + bootstrap, runs)

    with np.errstate(invalid="ignore", divide="ignore"):
        speed = 1000.0 * resampled("tokens") / resampled("time_ms")
        hit_rate = resampled("hits") / resampled("predrafts")
        accuracy = resampled("correct_branch") / resampled("predicted_rounds")
    target = next(i for i, run in enumerate(runs) if run.kind == "target")
    plain = [i for i, run in enumerate(runs) if run.kind in ("target", "plain")]
    best = max(plain, key=lambda i: speed[0, i])
    tail = (1.0 - confidence) / 2.0

    def interval(values: np.ndarray) -> Interval:
        if not np.isfinite(values[0]):
            return Interval(float("nan"), float("nan"), float("nan"))
        finite = values[1:][np.isfinite(values[1:])]
        if len(finite) == 0:
            return Interval(float(values[0]), float(values[0]), float(values[0]))
        low, high = np.quantile(finite, [tail, 1.0 - tail])
        return Interval(float(values[0]), float(low), float(high))

    results = []
    for i, run in enumerate(runs):
        totals = run.totals
        predicting = run.kind in ("predicted", "exhaustive", "oracle")
        tokens = int(totals.tokens.sum())
        results.append(PolicyResult(
            name=run.name, kind=run.kind, tokens_per_s=interval(speed[:, i]),
            speedup_vs_target=interval(speed[:, i] / speed[:, target]),
            speedup_vs_best_plain=interval(speed[:, i] / speed[:, best]),
            hit_rate=interval(hit_rate[:, i]) if predicting else None,
            branch_accuracy=(interval(accuracy[:, i]) if run.kind in ("predicted", "exhaustive", "sequential")
                             else None),
            wasted_per_token=float((totals.rejected.sum() + totals.discarded.sum()) / max(tokens, 1)),
            rounds=int(totals.rounds.sum()), tokens=tokens, time_s=float(totals.time_ms.sum() / 1000.0),
            predrafts=int(totals.predrafts.sum()), hits=int(totals.hits.sum()),
            approximate=not exact or bool(totals.over_depth.any()), config=run.config, draft_len=run.draft_len,
            width=run.width, totals=totals))
    return results, int(runs[best].draft_len)
