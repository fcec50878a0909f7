"""localvol: estimate the local volume (prior probability) of trained neural networks.

Reference replication of Scherlis & Belrose, "Estimating the Probability of Sampling a Trained
Neural Network at Random". Main entry point: :func:`estimate_log_volume`; with an error bar,
:func:`estimate_log_volume_reference`; over many processes,
:func:`localvol.distributed.estimate_log_volume_distributed`.
"""
from .adam import adam_moment
from .costs import CrossEntropyCost, ExpectedKL, QuadraticCost
from .curvature import hessian, hessian_diagonal, hesscale_diagonal, kl_hessian
from .estimator import VolumeEstimate, VolumeRun, estimate_log_volume, sample_directions
from .preconditioners import (
    DiagonalPreconditioner,
    MatrixPreconditioner,
    PaperMatrixPreconditioner,
    unit_determinant_scales,
)
from .priors import GaussianPrior, LebesguePrior
from .radius import RadiusResult, RadiusSearchError, find_radius
from .reference import ReferenceEstimate, estimate_log_volume_reference
from .selection import Selection, select_and_estimate
from .ray_integral import log_gaussian_ray_integral, log_unit_ball_volume, log_unit_sphere_area

__all__ = [
    "adam_moment",
    "CrossEntropyCost",
    "ExpectedKL",
    "QuadraticCost",
    "hessian",
    "hessian_diagonal",
    "hesscale_diagonal",
    "kl_hessian",
    "VolumeEstimate",
    "VolumeRun",
    "estimate_log_volume",
    "sample_directions",
    "DiagonalPreconditioner",
    "MatrixPreconditioner",
    "PaperMatrixPreconditioner",
    "unit_determinant_scales",
    "GaussianPrior",
    "LebesguePrior",
    "RadiusResult",
    "RadiusSearchError",
    "find_radius",
    "ReferenceEstimate",
    "estimate_log_volume_reference",
    "Selection",
    "select_and_estimate",
    "log_gaussian_ray_integral",
    "log_unit_ball_volume",
    "log_unit_sphere_area",
]
