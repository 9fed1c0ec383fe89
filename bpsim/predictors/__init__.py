"""Acceptance predictors behind one interface; importing this package registers every family."""

from bpsim.predictors.base import (  # noqa: F401
    BatchFeatures,
    Prediction,
    Predictor,
    PredictorConfigError,
    RoundFeatures,
    predictor_from_config,
)
