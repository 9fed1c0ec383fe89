"""Predictors stepped on tensors: many configurations of one family over many requests at once.

A stepper keeps the state of ``configs x rows`` lanes (config-major: lane = config * rows + row)
and is called once per simulated round with that round's draft lengths and features, then
updated with the verdicts. Each stepper reproduces its family's scalar ``predict``/``update``
path in ``bpsim.predictors`` exactly; the tests check that round by round. A family without a
stepper here runs through ``ScalarStepper``, one Python call per lane per round, which is exact
but slow.

Every lane starts a fresh request, so a stepper's initial state is the family's state after
``reset()``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from bpsim.predictors.base import Predictor, RoundFeatures

logger = logging.getLogger(__name__)



@dataclass
class StepFeatures:
    """Inputs of a predictor in one round, for every lane; tensors are (lanes,) or (lanes, width)."""

    draft_len: torch.Tensor  # long
    position: torch.Tensor  # long, output tokens before the round
    context_len: torch.Tensor  # long, prompt + position
    draft_max_prob: torch.Tensor | None = None  # float32, NaN at and past draft_len
    draft_entropy: torch.Tensor | None = None  # float32, NaN at and past draft_len


class LaneStepper:
    """Base class: ``configs`` predictors of one family over ``rows`` requests on ``device``."""

    needs_features = False  # whether ``predict`` reads draft_max_prob and draft_entropy
    draft_len_bound = 0  # the largest draft_len ``predict`` may be given; set by ``build_stepper``

    def __init__(self, predictors: list[Predictor], rows: int, device: torch.device):
        self.predictors = predictors
        self.configs, self.rows, self.device = len(predictors), rows, device

    @property
    def lanes(self) -> int:
        return self.configs * self.rows

    def per_lane(self, values) -> torch.Tensor:
        """Broadcast one value per config to every lane, (lanes,)."""
        tensor = torch.as_tensor(values, device=self.device)
        return tensor.repeat_interleave(self.rows)

    def predict(self, features: StepFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(predicted, next_draft_len)``, each (lanes,) long."""
        raise NotImplementedError

    def update(self, accepted: torch.Tensor, draft_len: torch.Tensor, active: torch.Tensor) -> None:
        """Take the verdicts; lanes where ``active`` is False keep their state."""


class ScalarStepper(LaneStepper):
    """Any predictor through its own ``predict``/``update``: one Python call per lane per round."""

    needs_features = True

    def __init__(self, predictors, rows, device):
        super().__init__(predictors, rows, device)
        self.instances = []
        for predictor in predictors:
            for _ in range(rows):
                instance = copy.deepcopy(predictor)
                instance.reset()
                self.instances.append(instance)

    def predict(self, features):
        draft_len = features.draft_len.tolist()
        position, context = features.position.tolist(), features.context_len.tolist()
        probs = features.draft_max_prob.double().cpu().numpy() if features.draft_max_prob is not None else None
        entropy = features.draft_entropy.double().cpu().numpy() if features.draft_entropy is not None else None
        predicted, next_len = [], []
        for lane, instance in enumerate(self.instances):
            n = draft_len[lane]
            round_features = RoundFeatures(
                n, tuple(probs[lane, :n].tolist()) if probs is not None else (),
                tuple(entropy[lane, :n].tolist()) if entropy is not None else (), position[lane], context[lane])
            prediction = instance.predict(round_features)
            predicted.append(prediction.predicted)
            next_len.append(prediction.next_draft_len)
        return (torch.tensor(predicted, device=self.device, dtype=torch.long),
                torch.tensor(next_len, device=self.device, dtype=torch.long))

    def update(self, accepted, draft_len, active):
        for lane in torch.nonzero(active).flatten().tolist():
            self.instances[lane].update(int(accepted[lane]), int(draft_len[lane]))


class TableStepper(LaneStepper):
    """Stateless families: the guess depends on draft_len only and the next draft_len on context_len only.

    ``guess_table`` is (configs, max_draft_len + 1) and ``length_table`` is (configs, contexts)
    over context lengths ``context_start ..``. Contexts outside the table take its nearest end.
    """

    def __init__(self, predictors, rows, device, guess_table: np.ndarray, length_table: np.ndarray,
                 context_start: int = 0):
        super().__init__(predictors, rows, device)
        self.guess_table = torch.as_tensor(guess_table, dtype=torch.long, device=device)
        self.length_table = torch.as_tensor(length_table, dtype=torch.long, device=device)
        self.context_start = context_start
        self.config_index = torch.arange(self.configs, device=device).repeat_interleave(rows)

    def predict(self, features):
        n = features.draft_len  # at most draft_len_bound, which sized the guess table
        context = (features.context_len - self.context_start).clamp(0, self.length_table.shape[1] - 1)
        predicted = self.guess_table[self.config_index, n]
        return torch.minimum(predicted, n), self.length_table[self.config_index, context]


def _context_range(context_start: int, context_stop: int) -> np.ndarray:
    return np.arange(context_start, max(context_stop, context_start + 1))


def static_stepper(predictors, rows, device, max_draft_len: int, context_start: int, context_stop: int):
    guess = np.array([[p.predict(RoundFeatures(n)).predicted for n in range(max_draft_len + 1)] for p in predictors])
    contexts = _context_range(context_start, context_stop)
    lengths = np.array([np.full(len(contexts), p.draft_len) for p in predictors])
    return TableStepper(predictors, rows, device, guess, lengths, context_start)


def distribution_stepper(predictors, rows, device, max_draft_len: int, context_start: int, context_stop: int):
    """Distribution families (binomial, capped-geometric, beta-*, empirical): tabulated through their own methods."""
    guess = np.array([[p.predicted_for(n) for n in range(max_draft_len + 1)] for p in predictors])
    contexts = _context_range(context_start, context_stop)
    lengths = np.array([np.asarray(p.next_draft_len(contexts.astype(float)), dtype=np.int64) for p in predictors])
    return TableStepper(predictors, rows, device, guess, lengths, context_start)


class HazardGLMStepper(LaneStepper):
    """The hazard GLM: a per-round pmf from the drafts' confidences, then argmax_j P(j) g(j)."""

    needs_features = True

    def __init__(self, predictors, rows, device, context_start: int, context_stop: int):
        super().__init__(predictors, rows, device)
        self.coefficients = self.per_lane_matrix([p.coefficients for p in predictors])  # (lanes, 4)
        self.means = self.per_lane_matrix([p.mean_features for p in predictors])  # (lanes, 2)
        self.bonus = self.per_lane([p.bonus_guess_rate for p in predictors]).double()
        self.correction = self.per_lane([p.correction_guess_rate for p in predictors]).double()
        contexts = _context_range(context_start, context_stop)
        lengths = np.array([np.asarray(p.next_draft_len(contexts.astype(float)), dtype=np.int64) for p in predictors])
        self.length_table = torch.as_tensor(lengths, dtype=torch.long, device=device)
        self.context_start = context_start
        self.config_index = torch.arange(self.configs, device=device).repeat_interleave(rows)

    def per_lane_matrix(self, rows_per_config) -> torch.Tensor:
        matrix = torch.tensor(rows_per_config, dtype=torch.float64, device=self.device)
        return matrix.repeat_interleave(self.rows, dim=0)

    def predict(self, features):
        n = features.draft_len  # (lanes,)
        width = features.draft_max_prob.shape[1]
        max_prob = features.draft_max_prob.double()  # (lanes, width)
        entropy = features.draft_entropy.double()
        max_prob = torch.where(torch.isnan(max_prob), self.means[:, :1], max_prob)
        entropy = torch.where(torch.isnan(entropy), self.means[:, 1:], entropy)
        depth = torch.arange(width, device=self.device, dtype=torch.float64)[None, :]
        b = self.coefficients
        logit = b[:, :1] + b[:, 1:2] * max_prob + b[:, 2:3] * entropy + b[:, 3:4] * depth
        hazard = 1.0 / (1.0 + torch.exp(-logit))
        judged = depth < n[:, None]
        hazard = torch.where(judged, hazard, torch.zeros_like(hazard))
        ones = torch.ones_like(hazard[:, :1])
        survive = torch.cat([ones, torch.cumprod(hazard, dim=1)], dim=1)  # (lanes, width + 1)
        stop = torch.cat([1.0 - hazard, ones], dim=1)
        pmf = survive * stop
        j = torch.arange(width + 1, device=self.device)[None, :]
        weights = torch.where(j == n[:, None], self.bonus[:, None], self.correction[:, None])
        score = torch.where(j <= n[:, None], pmf * weights, torch.full_like(pmf, -1.0))
        predicted = torch.where(n > 0, torch.argmax(score, dim=1), torch.zeros_like(n))
        context = (features.context_len - self.context_start).clamp(0, self.length_table.shape[1] - 1)
        return predicted, self.length_table[self.config_index, context]


# ---------------------------------------------------------------------------------------------
# History families


def length_rule(rule: torch.Tensor, predicted, draft_len, fixed, max_draft_len) -> torch.Tensor:
    """``apply_length_rule`` of ``bpsim.predictors.history`` per lane; rule 0 fixed, 1 follow, 2 plus2-minus1."""
    follow = predicted + 1
    plus2_minus1 = torch.where(predicted >= draft_len, draft_len + 2, draft_len - 1)
    proposed = torch.where(rule == 1, follow, plus2_minus1)
    clipped = torch.minimum(torch.clamp(proposed, min=1), max_draft_len)
    return torch.where(rule == 0, fixed, clipped)


class HistoryStepper(LaneStepper):
    """Shared draft-length rule of ``HistoryPredictor`` families."""

    RULES = {"fixed": 0, "follow": 1, "plus2-minus1": 2}

    def __init__(self, predictors, rows, device):
        super().__init__(predictors, rows, device)
        self.rule = self.per_lane([self.RULES[p.length_rule] for p in predictors])
        self.fixed = self.per_lane([p.draft_len for p in predictors])
        self.max_draft_len = self.per_lane([p.max_draft_len for p in predictors])

    def guess(self, draft_len: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, features):
        n = features.draft_len
        predicted = torch.minimum(torch.clamp(self.guess(n), min=0), n)
        return predicted, length_rule(self.rule, predicted, n, self.fixed, self.max_draft_len)


class LastValueStepper(HistoryStepper):
    def __init__(self, predictors, rows, device):
        super().__init__(predictors, rows, device)
        self.last = torch.full((self.lanes,), -1, dtype=torch.long, device=device)  # -1: no round yet

    def guess(self, n):
        return torch.where(self.last < 0, n, self.last)

    def update(self, accepted, draft_len, active):
        self.last = torch.where(active, accepted, self.last)


class ExpAverageStepper(HistoryStepper):
    def __init__(self, predictors, rows, device):
        super().__init__(predictors, rows, device)
        self.alpha = self.per_lane([p.alpha for p in predictors]).double()
        self.mean = self.per_lane([p.initial for p in predictors]).double()

    def guess(self, n):
        return torch.round(self.mean).long()  # half to even, as np.rint

    def update(self, accepted, draft_len, active):
        updated = (1.0 - self.alpha) * self.mean + self.alpha * accepted.double()
        self.mean = torch.where(active, updated, self.mean)


class SaturatingCounterStepper(HistoryStepper):
    def __init__(self, predictors, rows, device):
        super().__init__(predictors, rows, device)
        bits = self.per_lane([p.bits for p in predictors])
        self.half = 1 << (bits - 1)
        self.top = (1 << bits) - 1
        self.counter = self.half.clone()
        self.last_partial = torch.zeros(self.lanes, dtype=torch.long, device=device)

    def guess(self, n):
        return torch.where(self.counter >= self.half, n, self.last_partial)

    def update(self, accepted, draft_len, active):
        full = accepted >= draft_len
        counter = torch.where(full, torch.minimum(self.counter + 1, self.top), torch.clamp(self.counter - 1, min=0))
        self.counter = torch.where(active, counter, self.counter)
        self.last_partial = torch.where(active & ~full, accepted, self.last_partial)


class TwoLevelStepper(HistoryStepper):
    """Dense per-lane pattern tables: lanes x symbols^history patterns x (max_symbol + 2) counts.

    Symbols -1..max_symbol + 1 are shifted by one to index the table. Every config of one stepper
    must share ``history`` and ``max_symbol`` (``build_stepper`` groups them so).
    """

    def __init__(self, predictors, rows, device):
        super().__init__(predictors, rows, device)
        self.history, self.max_symbol = predictors[0].history, predictors[0].max_symbol
        self.outcomes = self.max_symbol + 2
        self.base = self.max_symbol + 3  # distinct symbols in a pattern, -1 included
        self.patterns = self.base ** self.history
        fitted = torch.zeros((self.configs, self.patterns, self.outcomes), dtype=torch.float64)
        for config, predictor in enumerate(predictors):
            for pattern, counts in predictor.fitted_table.items():
                symbols = [int(s) for s in pattern.split(",")]
                fitted[config, self.encode(symbols)] = torch.tensor(counts, dtype=torch.float64)
        self.table = fitted.to(device).repeat_interleave(rows, dim=0)  # (lanes, patterns, outcomes)
        self.pattern = torch.full((self.lanes,), self.encode([-1] * self.history), dtype=torch.long, device=device)
        self.lane_index = torch.arange(self.lanes, device=device)

    def encode(self, symbols) -> int:
        code = 0
        for symbol in symbols:
            code = code * self.base + (symbol + 1)
        return code

    @staticmethod
    def table_entries(predictor) -> int:
        """Counters held per lane."""
        return (predictor.max_symbol + 3) ** predictor.history * (predictor.max_symbol + 2)

    def guess(self, n):
        entry = self.lane_index * self.patterns + self.pattern  # (lanes,) row of the flattened table
        counts = self.table.view(-1, self.outcomes).index_select(0, entry)  # (lanes, outcomes)
        best = torch.argmax(counts, dim=1)  # first maximum, as np.argmax
        empty = counts.amax(dim=1) == 0
        return torch.where(empty | (best == self.max_symbol + 1), n, best)

    def update(self, accepted, draft_len, active):
        symbol = torch.where(accepted >= draft_len, self.max_symbol + 1, torch.clamp(accepted, max=self.max_symbol))
        cell = (self.lane_index * self.patterns + self.pattern) * self.outcomes + symbol  # (lanes,)
        self.table.view(-1).index_add_(0, cell[active], torch.ones_like(cell[active], dtype=self.table.dtype))
        shifted = (self.pattern % (self.base ** (self.history - 1))) * self.base + (symbol + 1)
        self.pattern = torch.where(active, shifted, self.pattern)


class OneBitStepper(LaneStepper):
    def __init__(self, predictors, rows, device):
        super().__init__(predictors, rows, device)
        self.high = self.per_lane([p.high_draft_len for p in predictors])
        self.low = self.per_lane([p.low_draft_len for p in predictors])
        self.all_accepted = torch.ones(self.lanes, dtype=torch.bool, device=device)

    def predict(self, features):
        n = features.draft_len
        return (torch.where(self.all_accepted, n, torch.zeros_like(n)),
                torch.where(self.all_accepted, self.high, self.low))

    def update(self, accepted, draft_len, active):
        self.all_accepted = torch.where(active, accepted >= draft_len, self.all_accepted)


HISTORY_STEPPERS = {
    "last-value": LastValueStepper,
    "plus2-minus1": LastValueStepper,
    "exp-average": ExpAverageStepper,
    "saturating-counter": SaturatingCounterStepper,
    "two-level": TwoLevelStepper,
    "one-bit": OneBitStepper,
}
DISTRIBUTION_FAMILIES = ("binomial", "capped-geometric", "beta-binomial", "beta-geometric", "empirical")


def stepper_group_key(predictor: Predictor) -> tuple:
    """Configs with the same key can share one stepper."""
    if predictor.family == "two-level":
        return (predictor.family, predictor.history, predictor.max_symbol)
    return (predictor.family,)


def state_entries_per_lane(predictor: Predictor) -> int:
    """Return how many float64 values of state a vectorised stepper keeps per lane (for chunking lanes)."""
    if predictor.family == "two-level":
        return TwoLevelStepper.table_entries(predictor)
    return 4


def has_vectorised_stepper(family: str) -> bool:
    return family in HISTORY_STEPPERS or family in DISTRIBUTION_FAMILIES or family in ("static", "hazard-glm")


def build_stepper(predictors: list[Predictor], rows: int, device: torch.device, *, max_draft_len: int,
                  context_start: int, context_stop: int, vectorised: bool = True) -> LaneStepper:
    """Return the stepper of one group of same-family predictors (see ``stepper_group_key``).

    ``max_draft_len`` bounds the draft lengths the stepper will be asked about and
    ``context_start..context_stop`` the context lengths. ``vectorised=False`` forces the scalar path.
    """
    family = predictors[0].family
    if any(stepper_group_key(p) != stepper_group_key(predictors[0]) for p in predictors):
        raise ValueError("build_stepper takes predictors of one group; split them with stepper_group_key")
    if not vectorised or not has_vectorised_stepper(family):
        if vectorised:
            logger.warning("predictor family %r has no vectorised replay; stepping it one lane at a time", family)
        stepper = ScalarStepper(predictors, rows, device)
    elif family == "static":
        stepper = static_stepper(predictors, rows, device, max_draft_len, context_start, context_stop)
    elif family in DISTRIBUTION_FAMILIES:
        stepper = distribution_stepper(predictors, rows, device, max_draft_len, context_start, context_stop)
    elif family == "hazard-glm":
        stepper = HazardGLMStepper(predictors, rows, device, context_start, context_stop)
    else:
        stepper = HISTORY_STEPPERS[family](predictors, rows, device)
    stepper.draft_len_bound = max_draft_len
    return stepper


def max_draft_len_of(predictor: Predictor, default: int) -> int:
    """Return the largest draft_len a predictor's parameters allow it to choose, at least ``default``."""
    params = predictor.params()
    candidates = [default]
    for name in ("max_draft_len", "draft_len", "high_draft_len"):
        if isinstance(params.get(name), int):
            candidates.append(params[name])
    if params.get("draft_lens"):
        candidates.append(max(int(m) for m in params["draft_lens"]))
    return max(candidates)


def first_draft_len(predictor: Predictor, context_len: int) -> int:
    """Return the draft_len of a request's first round, before the predictor has seen any round.

    NOTE: the predictor interface has no such method yet, so this follows each family's own
    setting. A predictor's ``initial_draft_len(context_len)`` comes first when it defines one.
    Next come its ``draft_len`` (static and history families) and ``high_draft_len`` (one-bit,
    whose fresh state is "all accepted"). Otherwise it is the ``next_draft_len`` returned for a
    round without drafts at the prompt's end, as for the distribution and GLM families, whose
    choice depends only on the context length.
    """
    method = getattr(predictor, "initial_draft_len", None)
    if callable(method):
        return int(method(context_len))
    params = predictor.params()
    for name in ("draft_len", "high_draft_len"):
        if isinstance(params.get(name), int):
            return int(params[name])
    fresh = copy.deepcopy(predictor)
    fresh.reset()
    return int(fresh.predict(RoundFeatures(0, context_len=context_len)).next_draft_len)
