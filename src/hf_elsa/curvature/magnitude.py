"""No curvature: the projection scores by ``|v|`` (the paper's default)."""

from .base import CurvatureEstimator


class Magnitude(CurvatureEstimator):
    name = "magnitude"
