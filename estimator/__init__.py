"""The analytic estimator: pure Python, no torch. ``estimate(load_model(name), Workload(...))``."""

from estimator.catalogue import list_models, load_model
from estimator.coefficients import Coefficients, load_coefficients, select_coefficients
from estimator.errors import UserError
from estimator.estimate import Estimate, estimate, max_batch, max_context, predict_parts
from estimator.gpus import GPUS, find_gpu
from estimator.spec import ModelSpec
from estimator.terms import Workload, features

__all__ = [
    "Coefficients", "Estimate", "GPUS", "ModelSpec", "UserError", "Workload", "estimate", "features",
    "find_gpu", "list_models", "load_coefficients", "load_model", "max_batch", "max_context",
    "predict_parts", "select_coefficients",
]
