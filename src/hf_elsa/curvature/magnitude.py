"""No curvature: the projection scores by ``|v|`` (the paper's default)."""

from .base import CurvatureEstimator, register_estimator


class Magnitude(CurvatureEstimator):
    name = "magnitude"


register_estimator(Magnitude())
