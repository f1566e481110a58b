"""Diagonal curvature (Hessian-diagonal) estimates for the objective-aware projection.

One ``CurvatureEstimator`` per ``ElsaConfig.importance``, each in its own module that registers it; adding
one is a subclass and one ``register_estimator``. The optimizer, the trainer, the config and ``estimate_memory``
ask the estimator (``get_estimator(name)``) instead of comparing strings. Costs and limits: docs/curvature.md.
"""

from __future__ import annotations

from .activation import (
    ACT_NEW_SUM,
    ACT_NEW_TOKENS,
    ACT_SUM,
    ACT_TOKENS,
    Activation,
    ActivationStatistics,
    merge_statistics,
)
from .adam import Adam
from .base import (
    ESTIMATORS,
    CurvatureEstimator,
    accumulation_dtype,
    get_estimator,
    register_estimator,
    update_running_mean,
)
from .fisher import FISHER, FISHER_COUNT, Fisher, update_fisher
from .hutchinson import (
    DOUBLE_BACKWARD_ATTENTION,
    HESSIAN,
    HESSIAN_COUNT,
    SASSHA_HESSIAN,
    Hutchinson,
    all_reduce_mean,
    check_double_backward,
    double_backward_attention,
    hutchinson_diagonal,
    probe_generator,
    rademacher_like,
)
from .magnitude import Magnitude

__all__ = [
    "ACT_NEW_SUM",
    "ACT_NEW_TOKENS",
    "ACT_SUM",
    "ACT_TOKENS",
    "DOUBLE_BACKWARD_ATTENTION",
    "ESTIMATORS",
    "FISHER",
    "FISHER_COUNT",
    "HESSIAN",
    "HESSIAN_COUNT",
    "SASSHA_HESSIAN",
    "Activation",
    "ActivationStatistics",
    "Adam",
    "CurvatureEstimator",
    "Fisher",
    "Hutchinson",
    "Magnitude",
    "accumulation_dtype",
    "all_reduce_mean",
    "check_double_backward",
    "double_backward_attention",
    "get_estimator",
    "hutchinson_diagonal",
    "merge_statistics",
    "probe_generator",
    "rademacher_like",
    "register_estimator",
    "update_fisher",
    "update_running_mean",
]
