"""The predictor interface: guess how many drafts the target will accept, before it says.

A round runs draft -> predict -> verify -> check. ``predict`` is called once the round's drafts
exist and before the target's verdict; ``update`` is called with the verdict. The prediction is
the branch point that pre-drafting starts from and sets the next round's ``draft_len``.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from bpsim.errors import BpsimError

CONFIG_VERSION = 1


class PredictorConfigError(BpsimError, ValueError):
    """A predictor config with an unknown family, version or an invalid parameter."""


@dataclass(frozen=True)
class RoundFeatures:
    """What a predictor may see before verification ends: this round's drafts and their confidences."""

    draft_len: int
    draft_max_prob: tuple[float, ...] = ()  # per drafted token, the draft's max probability
    draft_entropy: tuple[float, ...] = ()  # per drafted token, entropy of the draft's distribution (nats)
    position: int = 0  # new tokens before this round
    context_len: int = 0

    def __post_init__(self):
        if self.draft_len < 0:
            raise ValueError(f"draft_len must be >= 0, got {self.draft_len}")
        for name in ("draft_max_prob", "draft_entropy"):
            values = getattr(self, name)
            if values and len(values) != self.draft_len:
                raise ValueError(f"{name} has {len(values)} entries for draft_len {self.draft_len}")


@dataclass(frozen=True)
class Prediction:
    predicted: int  # expected accepted drafts this round, 0..draft_len
    next_draft_len: int  # draft_len of the next round; 0 means plain target decoding

    def __post_init__(self):
        if self.predicted < 0 or self.next_draft_len < 0:
            raise ValueError(f"prediction values must be >= 0, got {self}")


@dataclass(frozen=True)
class BatchFeatures:
    """Features of many rounds at once for offline scoring; arrays are (rounds,) or (rounds, max_draft_len)."""

    request_id: np.ndarray  # (rounds,) int; rounds of one request are contiguous and in order
    draft_len: np.ndarray  # (rounds,) int
    draft_max_prob: np.ndarray | None = None  # (rounds, max_draft_len) float, NaN past draft_len
    draft_entropy: np.ndarray | None = None  # (rounds, max_draft_len) float, NaN past draft_len
    position: np.ndarray | None = None  # (rounds,) int
    extra: dict = field(default_factory=dict)
    context_len: np.ndarray | None = None  # (rounds,) int, tokens before the round (prompt included)


class Predictor(abc.ABC):
    """Base class of every predictor family; subclasses register themselves by ``family``."""

    family: ClassVar[str]
    registry: ClassVar[dict[str, type["Predictor"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            Predictor.registry[cls.family] = cls

    @abc.abstractmethod
    def predict(self, features: RoundFeatures) -> Prediction:
        """Return the expected accepted count and the next draft_len, before verification."""

    @abc.abstractmethod
    def update(self, accepted: int, draft_len: int) -> None:
        """Take the target's verdict for the round just predicted."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget per-request history; called at the start of every request."""

    @abc.abstractmethod
    def params(self) -> dict:
        """JSON-safe constructor arguments."""

    def to_config(self) -> dict:
        return {"version": CONFIG_VERSION, "family": self.family, "params": self.params()}

    @classmethod
    def from_config(cls, config: dict) -> "Predictor":
        return predictor_from_config(config)

    def predict_batch(self, features: BatchFeatures, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replay recorded rounds in order; return ``(predicted, next_draft_len)``, each (rounds,).

        ``accepted`` holds the recorded verdicts, fed to ``update`` after each prediction, so a
        history predictor sees exactly what it would have seen live. Families with a vectorised
        form override this; the default steps the scalar path.
        """
        predicted = np.zeros(len(features.draft_len), dtype=np.int64)
        next_len = np.zeros(len(features.draft_len), dtype=np.int64)
        previous_request = None
        for i, request in enumerate(features.request_id):
            if request != previous_request:
                self.reset()
                previous_request = request
            n = int(features.draft_len[i])
            probs = () if features.draft_max_prob is None else tuple(features.draft_max_prob[i, :n].tolist())
            entropy = () if features.draft_entropy is None else tuple(features.draft_entropy[i, :n].tolist())
            position = 0 if features.position is None else int(features.position[i])
            context_len = 0 if features.context_len is None else int(features.context_len[i])
            prediction = self.predict(RoundFeatures(n, probs, entropy, position, context_len))
            predicted[i], next_len[i] = prediction.predicted, prediction.next_draft_len
            self.update(int(accepted[i]), n)
        return predicted, next_len


def predictor_from_config(config: dict) -> Predictor:
    """Build a predictor from ``to_config()`` output, rejecting unknown versions and families."""
    if not isinstance(config, dict):
        raise PredictorConfigError(f"a predictor config must be a JSON object, got {type(config).__name__}")
    version = config.get("version")
    if version != CONFIG_VERSION:
        raise PredictorConfigError(f"predictor config version {version!r} is not supported (this bpsim reads "
                                   f"version {CONFIG_VERSION}); re-export it with this bpsim version")
    family = config.get("family")
    if family not in Predictor.registry:
        raise PredictorConfigError(f"unknown predictor family {family!r}; known: {', '.join(sorted(Predictor.registry))}")
    predictor_class = Predictor.registry[family]
    params = config.get("params", {})
    required = [name for name, parameter in inspect.signature(predictor_class).parameters.items()
                if parameter.default is inspect.Parameter.empty
                and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    missing = [name for name in required if name not in params]
    if missing:
        raise PredictorConfigError(f"predictor family {family!r} is missing parameter {', '.join(missing)} "
                                   f"(it needs {', '.join(required)}); re-export it with bpsim export")
    try:
        return predictor_class(**params)
    except (TypeError, ValueError) as error:
        raise PredictorConfigError(f"invalid parameters for predictor family {family!r}: {error}; "
                                   "re-export it with bpsim export") from error
