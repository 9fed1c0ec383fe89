"""Sampling settings shared by the target and the draft, and the random generator they draw from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bpsim.errors import BpsimError


class SamplingConfigError(BpsimError, ValueError):
    """A temperature, top-k, top-p or seed outside its valid range."""


@dataclass(frozen=True)
class SamplingConfig:
    """Token selection settings, applied alike to the target's and the draft's logits.

    ``temperature == 0`` means greedy decoding, where ``top_k`` and ``top_p`` have no effect.
    ``top_k=None`` and ``top_p=1.0`` switch those filters off.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SamplingConfigError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise SamplingConfigError(f"top_k must be an integer >= 1, or None to switch it off; got {self.top_k!r}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingConfigError(f"top_p must lie in (0, 1] (1 switches it off), got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SamplingConfigError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def request_generator(seed: int, request_id: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return a generator seeded from ``(seed, request_id)``.

    Seeding each request on its own makes its output independent of which requests ran
    before it, so a run limited to fewer prompts reproduces the same answers.
    """
    state = np.random.SeedSequence([seed, request_id]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))
