"""Acceptance predictors behind one interface; importing this package registers every family."""

from bpsim.predictors.base import (  # noqa: F401
    BatchFeatures,
    Prediction,
    Predictor,
    PredictorConfigError,
    RoundFeatures,
    predictor_from_config,
)
from bpsim.predictors import distribution, features, history, static  # noqa: F401,E402  (registers the families)
