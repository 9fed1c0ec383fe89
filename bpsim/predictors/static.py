"""Static predictors: the same guess every round, the baselines every other family must beat."""

from __future__ import annotations

import numpy as np

from bpsim.predictors.base import BatchFeatures, Prediction, Predictor, RoundFeatures

CHOICES = ("all", "fixed", "zero")


class StaticPredictor(Predictor):
    """Predict all drafts accepted (``all``), ``min(k, draft_len)`` (``fixed``) or none (``zero``).

    The next round always drafts ``draft_len`` tokens, 0 meaning plain target decoding.
    """

    family = "static"

    def __init__(self, choice: str = "all", k: int = 0, draft_len: int = 4):
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        if k < 0 or draft_len < 0:
            raise ValueError(f"k and draft_len must be >= 0, got k={k}, draft_len={draft_len}")
        self.choice, self.k, self.draft_len = choice, int(k), int(draft_len)

    def _predicted(self, draft_len):
        if self.choice == "all":
            return draft_len
        if self.choice == "fixed":
            return np.minimum(self.k, draft_len)
        return np.zeros_like(draft_len)

    def predict(self, features: RoundFeatures) -> Prediction:
        return Prediction(int(self._predicted(features.draft_len)), self.draft_len)

    def update(self, accepted: int, draft_len: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def params(self) -> dict:
        return {"choice": self.choice, "k": self.k, "draft_len": self.draft_len}

    def predict_batch(self, features: BatchFeatures, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        draft_len = np.asarray(features.draft_len, dtype=np.int64)
        return self._predicted(draft_len).astype(np.int64), np.full(len(draft_len), self.draft_len, dtype=np.int64)
