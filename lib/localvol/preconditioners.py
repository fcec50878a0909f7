"""Unit-determinant preconditioners for importance sampling of directions: paper §3.2, eq. 15-18.

A preconditioner maps isotropic draws u (B, N) to v = P u. P is symmetric positive definite
with det P = 1, so the estimator of eq. 15 stays unbiased. Its spectrum is built from a
curvature-like vector s (Hessian eigenvalues, diag(H), HesScale, Adam moments):

    p_j = 1 / (|s_j|^exponent + eps),   then   p_j ← p_j / exp(mean_j log p_j)     (eq. 17-18)

so that Σ_j log p_j = 0. The exponent defaults to 1/2 (P ∝ H^(−1/2), eq. 16).
"""
from __future__ import annotations

import math

import torch

from ._reduce import _sum_last

__all__ = [
    "DiagonalPreconditioner",
    "MatrixPreconditioner",
    "PaperMatrixPreconditioner",
    "unit_determinant_scales",
]


def unit_determinant_scales(values: torch.Tensor, eps: float, exponent: float = 0.5) -> torch.Tensor:
    """p = 1/(|s|^exponent + eps) normalised so that mean(log p) = 0 (eq. 17-18).

    Args:
        values: (N,) tensor s of any float dtype (eigenvalues, a diagonal, Adam moments).
        eps: float ≥ 0, added to |s|^exponent (same units as |s|^exponent).
        exponent: float ≥ 0 (0 gives the identity, i.e. the naive estimator).

    Returns:
        (N,) float64 tensor of positive scales with Σ log p = 0 (product 1), same device.

    Raises:
        ValueError: if values are not 1-D or have non-finite entries, eps < 0 or not finite,
            exponent < 0 or not finite, or a resulting scale is not finite and positive
            (e.g. s_j = 0 with eps = 0).
    """
    values = torch.as_tensor(values)
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and ≥ 0, got {eps!r}")
    if not math.isfinite(exponent) or exponent < 0:
        raise ValueError(f"exponent must be finite and ≥ 0, got {exponent!r}")
    bad = ~torch.isfinite(values)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"values must be finite, got values[{i}] = {values[i].item()!r}")
    log_p = -torch.log(values.double().abs() ** exponent + eps)
    bad = ~torch.isfinite(log_p)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"preconditioner scale 1/(|s|^{exponent} + {eps}) is not finite and positive at index {i} "
            f"(s = {values[i].item()!r}); use eps > 0"
        )
    # the mean in a fixed order: every process of a sharded run gets the same scales
    return torch.exp(log_p - _sum_last(log_p) / log_p.numel())


class _UnitDeterminant:
    """Shared state of the preconditioners: scales p (eq. 17-18), eps, exponent."""

    def _set_scales(self, spectrum, eps: float, exponent: float) -> None:
        self.scales = unit_determinant_scales(spectrum, eps, exponent)  # (N,) float64
        self.eps, self.exponent = eps, exponent

    @property
    def n(self) -> int:
        return self.scales.numel()

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n}, eps={self.eps}, exponent={self.exponent})"


class DiagonalPreconditioner(_UnitDeterminant):
    """P = diag(p), p from a vector s by eq. 18 (diag(H), HesScale, Adam μ or ν).

    Args:
        values: (N,) tensor s (float, any device; P lives on the same device).
        eps: float ≥ 0. exponent: float ≥ 0, default 0.5.

    ``apply(u)`` maps (B, N) to (B, N) in u's dtype. Raises ValueError as
    :func:`unit_determinant_scales`, and on a shape mismatch in ``apply``.
    """

    def __init__(self, values, eps: float, exponent: float = 0.5):
        self._set_scales(values, eps, exponent)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        _check_batch(u, self.n)
        return u * self.scales.to(u.device, u.dtype)


class MatrixPreconditioner(_UnitDeterminant):
    """P = V diag(p) Vᵀ from a symmetric matrix H = V diag(λ) Vᵀ, p from λ by eq. 17.

    This is eq. 16-17 applied correctly; the paper's code omitted the final V (see
    :class:`PaperMatrixPreconditioner` and docs/authors-code.md#hessian-mis-application). For
    H = A of a quadratic cost and eps = 0 the estimator has zero variance.

    Args:
        matrix: (N, N) symmetric tensor (e.g. the Hessian of the KL at the anchor).
        eps: float ≥ 0. exponent: float ≥ 0, default 0.5.

    Raises:
        ValueError: if the matrix is not square, not symmetric (relative 1e-6), not finite,
            or the scales are invalid (see :func:`unit_determinant_scales`).
    """

    def __init__(self, matrix, eps: float, exponent: float = 0.5):
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square (N, N), got shape {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError("matrix has non-finite entries")
        m64 = matrix.double()
        asym = (m64 - m64.T).abs().max().item()
        if asym > 1e-6 * max(m64.abs().max().item(), 1e-300):
            raise ValueError(f"matrix must be symmetric, got max |H - Hᵀ| = {asym:.3g}")
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (m64 + m64.T))
        self._init(eigenvalues, eigenvectors, eps, exponent)

    @classmethod
    def from_eigh(cls, eigenvalues, eigenvectors, eps: float, exponent: float = 0.5):
        """Build from an existing eigendecomposition (λ (N,), V (N, N) with columns eigenvectors)."""
        self = cls.__new__(cls)
        eigenvectors = torch.as_tensor(eigenvectors)
        if eigenvectors.ndim != 2 or eigenvectors.shape[0] != eigenvectors.shape[1]:
            raise ValueError(f"eigenvectors must be (N, N), got {tuple(eigenvectors.shape)}")
        if torch.as_tensor(eigenvalues).shape != (eigenvectors.shape[0],):
            raise ValueError(
                f"eigenvalues must be ({eigenvectors.shape[0]},), got {tuple(torch.as_tensor(eigenvalues).shape)}"
            )
        if not torch.isfinite(eigenvectors).all():
            raise ValueError("eigenvectors has non-finite entries")
        V = eigenvectors.double()
        probe = torch.randn(V.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(V.device)
        err = float((V.T @ (V @ probe) - probe).norm() / probe.norm())
        if err > 1e-6:
            raise ValueError(f"eigenvectors must be orthonormal (columns of an orthogonal V); |VᵀV x − x|/|x| = {err:.3g}")
        self._init(torch.as_tensor(eigenvalues), eigenvectors, eps, exponent)
        return self

    def _init(self, eigenvalues, eigenvectors, eps, exponent):
        self._set_scales(eigenvalues, eps, exponent)
        self.eigenvectors = eigenvectors.double()  # (N, N), columns

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """v = V diag(p) Vᵀ u for each row u of (B, N); computed in float64, returned in u's dtype."""
        _check_batch(u, self.n)
        V = self.eigenvectors.to(u.device)
        coords = u.double() @ V  # (B, N): Vᵀ u per row
        return ((coords * self.scales.to(u.device)) @ V.T).to(u.dtype)


class PaperMatrixPreconditioner(MatrixPreconditioner):
    """The paper code's full-Hessian preconditioner, v = diag(p) Vᵀ u
    (docs/authors-code.md#hessian-mis-application).

    Still unit-determinant (so the estimator stays unbiased) but it scales parameter
    coordinates in eigenvalue-rank order: kept only to reproduce Figure 1's "Hessian" row.
    """

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        _check_batch(u, self.n)
        V = self.eigenvectors.to(u.device)
        return ((u.double() @ V) * self.scales.to(u.device)).to(u.dtype)


def _check_batch(u: torch.Tensor, n: int) -> None:
    if u.ndim != 2 or u.shape[1] != n:
        raise ValueError(f"directions must have shape (B, {n}), got {tuple(u.shape)}")
