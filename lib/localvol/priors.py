"""Priors (measures) whose mass of the neighbourhood we estimate: paper §3.1 and §3.3.

Each prior turns the radius found along one direction into the per-sample log term of the
Monte Carlo estimator (eq. 10 / 15 for Lebesgue, eq. 19 for Gaussian), in nats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._reduce import _sum_last, row_dot64, row_dots64
from .ray_integral import log_gaussian_ray_integral, log_unit_ball_volume, log_unit_sphere_area

__all__ = ["GaussianPrior", "LebesguePrior"]


class GaussianPrior:
    """Gaussian measure N(0, diag(σ²)) centred at the ORIGIN (not at the anchor), paper §3.3.

    Args:
        sigma: standard deviation (not variance), in parameter units: a positive real number
            (float, int, NumPy scalar or 0-d tensor/array: isotropic), or a (N,) float/int
            tensor, array or list of per-parameter standard deviations.

    Raises:
        ValueError: if sigma is not numeric (str, None, bool, complex, strings in a list...),
            not finite and > 0, or not a scalar / 1-D vector.
    """

    def __init__(self, sigma):
        if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
            if not math.isfinite(sigma) or sigma <= 0:
                raise ValueError(f"sigma must be a finite standard deviation > 0, got {sigma!r}")
            self.sigma = float(sigma)
            return
        s = _numeric_tensor(sigma)
        if s.ndim == 0:
            self.__init__(float(s))
            return
        if s.ndim != 1:
            raise ValueError(f"sigma must be a float or a 1-D (N,) tensor, got shape {tuple(s.shape)}")
        bad = ~torch.isfinite(s) | (s <= 0)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"sigma must be finite and > 0 everywhere, got sigma[{i}] = {s[i].item()!r}")
        self.sigma = s

    def __repr__(self):
        if isinstance(self.sigma, float):
            return f"GaussianPrior(sigma={self.sigma!r})"
        return f"GaussianPrior(sigma=<tensor of {self.sigma.numel()} stds>)"

    def _inv_var(self, anchor: torch.Tensor) -> torch.Tensor | float:
        """1/σ² as a float, or an (N,) tensor on the anchor's device (anchor's dtype)."""
        if isinstance(self.sigma, float):
            return 1.0 / self.sigma**2
        if self.sigma.numel() != anchor.numel():
            raise ValueError(
                f"sigma has {self.sigma.numel()} entries but the anchor has {anchor.numel()} parameters"
            )
        return 1.0 / self.sigma.to(anchor.device, torch.float64) ** 2

    @property
    def sigma_max(self) -> float:
        return self.sigma if isinstance(self.sigma, float) else float(self.sigma.max())

    def log_density_at(self, anchor: torch.Tensor) -> float:
        """−|θ0/σ|²/2: log ρ(θ0) − log ρ(0), nats: the "prior term"
        (docs/authors-code.md#prior-dominated-interpretation)."""
        return float(-0.5 * row_dot64(anchor, weight=self._inv_var(anchor))) + 0.0  # no -0.0

    def log_normaliser(self, n: int) -> float:
        """log of the density at the origin: −(N/2) log 2π − Σ log σ_j (nats)."""
        if isinstance(self.sigma, float):
            return -0.5 * n * math.log(2 * math.pi) - n * math.log(self.sigma)
        log_sigma = torch.log(self.sigma.double().reshape(-1))
        return float(-0.5 * n * math.log(2 * math.pi) - _sum_last(log_sigma))  # thread-independent

    def ray_coefficients(self, anchor: torch.Tensor, directions: torch.Tensor):
        """a_i = Σ d_ij²/σ_j², b_i = −Σ d_ij θ0_j/σ_j² for each row d_i of ``directions``.

        The prior along θ0 + t d_i is exp(−a_i t²/2 + b_i t) · exp(−|θ0/σ|²/2) · normaliser.
        Returns two float64 NumPy arrays (B,), from one float64 pass over the rows.
        """
        inv_var = self._inv_var(anchor)
        a, minus_b = row_dots64((directions, None, inv_var), (directions, anchor, inv_var))
        return a.cpu().numpy(), (-minus_b).cpu().numpy()

    def log_ray_constant(self, anchor: torch.Tensor) -> float:
        """log|S^(N−1)| + log ρ(0) + (log ρ(θ0) − log ρ(0)): the part of every ray's log term
        (eq. 19) that does not depend on the ray, nats. One pass over the anchor."""
        n = anchor.numel()
        return log_unit_sphere_area(n) + self.log_normaliser(n) + self.log_density_at(anchor)

    def log_terms(self, anchor, directions, multipliers, log_u_norm) -> np.ndarray:
        """Per-sample log terms of eq. 19, nats: log|S^(N−1)| + log ρ-mass of the segment − N log|v|.

        Parametrised by the multiplier m along the (non-unit) preconditioned direction
        d = P u (u the isotropic draw, |u| ≈ 1): substituting t = m|d| in eq. 19 gives
        |d|^N ∫_0^m ρ(θ0 + s d) s^(N−1) ds, and dividing by |v|^N = (|d|/|u|)^N leaves
        |u|^N ∫_0^m ρ(θ0 + s d) s^(N−1) ds, so no precision is lost in N log|v| at large N.

        Args:
            anchor: (N,) tensor. directions: (B, N) tensor d_i. multipliers: (B,) float64
                array m_i (inf allowed: the whole ray). log_u_norm: (B,) float64 log|u_i|.
        """
        a, b = self.ray_coefficients(anchor, directions)
        return self.log_terms_from_coefficients(
            anchor.numel(), self.log_ray_constant(anchor), a, b, multipliers, log_u_norm
        )

    @staticmethod
    def log_terms_from_coefficients(n, log_constant, a, b, multipliers, log_u_norm) -> np.ndarray:
        """:meth:`log_terms` from precomputed pieces (the estimator computes them once per
        run and per batch): ``log_constant`` from :meth:`log_ray_constant`, (B,) float64 ``a``
        and ``b`` from :meth:`ray_coefficients`, (B,) multipliers and log|u_i| as there."""
        log_int = log_gaussian_ray_integral(a, b, n, np.asarray(multipliers, dtype=np.float64))
        return log_constant + log_int + n * np.asarray(log_u_norm, dtype=np.float64)


def _numeric_tensor(sigma) -> torch.Tensor:
    """sigma as a real (float or integer dtype) tensor; ValueError naming it if it is not numeric."""
    shown = repr(sigma)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    message = (
        "sigma must be a positive float or a 1-D tensor of standard deviations, "
        f"got {type(sigma).__name__} {shown}"
    )
    if sigma is None or isinstance(sigma, (str, bytes, bool, dict, set)):
        raise ValueError(message)
    # a Python list of floats would become float32 (the default dtype): keep float64
    dtype = torch.float64 if isinstance(sigma, (list, tuple)) else None
    try:
        s = torch.as_tensor(sigma, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as err:  # strings, None, ragged lists, objects
        raise ValueError(message) from err
    if s.dtype == torch.bool or not (s.is_floating_point() or s.dtype in _INTEGER_DTYPES):
        raise ValueError(message)  # bool or complex
    return s


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class LebesguePrior:
    """Lebesgue measure (plain volume) on R^N, paper §3.1 eq. 7-10 and eq. 15.

    Per-sample term: log(|S^(N−1)| r^N / N) − N log|v| = log V_N + N log m + N log|u|, with
    r = m|d| the radius along d = P u, |v| = |d|/|u|. Infinite radii give +inf (a warning is
    issued by the estimator: the neighbourhood has infinite volume).
    """

    def log_density_at(self, anchor):
        return None

    def log_terms(self, anchor, directions, multipliers, log_u_norm) -> np.ndarray:
        n = anchor.numel()
        m = np.asarray(multipliers, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return log_unit_ball_volume(n) + n * np.log(m) + n * np.asarray(log_u_norm, dtype=np.float64)
