"""Turn result values into strict JSON: numpy scalars to Python numbers, NaN and infinities to null."""

from __future__ import annotations

import math

import numpy as np


def json_safe(value):
    """Return ``value`` with numpy scalars made Python numbers and non-finite floats made None, recursively."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
