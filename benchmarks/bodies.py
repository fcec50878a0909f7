"""Star bodies of known volume, as (cost, anchor, prior, truth, curvature) for the estimators.

Each cost is the body's gauge about the anchor (or a power of it), so the star domain
{C < 1} seen from the anchor is the body; truth is log μ(body) in nats from a closed form or,
for the Gaussian measure of an ellipsoid, from the exact inversion integral
(`gaussian_ellipsoid.py`); curvature is the per-axis a_j^-2 a user's diagonal preconditioner
could know (what the misspecified preconditioner of the benchmarks is made from).

  ellipsoid        Lebesgue, semi-axes exp(g), g ~ N(0, 1): V_N ∏ a_j
  ellipsoid-shift  the same, anchor moved 0.5 of the way to the boundary along a random ray
  ellipsoid-wide   Lebesgue, semi-axes log-uniform over six decades (axis ratio 10^6)
  gauss-ellipsoid  N(0, I) mass of an ellipsoid with log-normal semi-axes scaled to 0.3 prior
                   sd, centre shifted, anchor at the centre: log P(Σ λ_j (Z_j + δ_j)² ≤ 1)
  gauss-ellipsoid-shift  the same, anchor moved 0.5 of the way to the boundary
  gauss-ellipsoid-wide   the same with semi-axes log-uniform over six decades (up to 3 prior sd)
  l1, l2, l4, linf, l0.5   Lebesgue l_p balls with log-normal per-axis scales:
                   ∏ 2 a_j Γ(1+1/p) / Γ(1+N/p) (l_inf: ∏ 2 a_j; p = 0.5 is not convex)
  box-gauss        N(0, I) mass of an anisotropic box, centre shifted: ∏ [Φ(u_j) − Φ(l_j)]
  cross            Lebesgue union of two boxes sharing their centre, long in complementary halves
                   of the axes (not convex): V1 + V2 − V(B1 ∩ B2)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import gammaln, log_ndtr, logsumexp

from localvol import GaussianPrior, LebesguePrior

from gaussian_ellipsoid import log_cdf_exact

DT = torch.float64


def _scales(n, rng, sd=1.0):
    return np.exp(sd * rng.standard_normal(n))


def _wide(n, rng, decades=6.0):
    """Semi-axes log-uniform over `decades` decades, the extremes included (axis ratio 10^decades)."""
    e = rng.uniform(-decades / 2, decades / 2, n)
    e[:2] = (-decades / 2, decades / 2)
    return 10.0 ** rng.permutation(e)


def _ellipsoid_gauge(axes, centre, anchor):
    """Gauge of the ellipsoid Σ((x − centre)/axes)² ≤ 1 about the anchor: 1/t*, with
    anchor + t*(θ − anchor) on the boundary (anchor inside)."""
    A, C, Q = (torch.as_tensor(x, dtype=DT) for x in (axes, centre, anchor))

    def cost(theta):
        d = theta - Q
        qa = ((d / A) ** 2).sum(-1)
        qb = 2 * (((Q - C) * d) / A**2).sum(-1)
        qc = (((Q - C) / A) ** 2).sum() - 1.0
        t = (-qb + torch.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
        return torch.where(qa > 0, 1.0 / t, torch.zeros_like(qa))

    return cost


def _shifted(centre, axes, rng, fraction=0.5):
    """A point `fraction` of the way from the centre to the boundary along a random ray."""
    d = rng.standard_normal(len(axes))
    d /= np.sqrt(np.sum((d / axes) ** 2))
    return centre + fraction * d


def ellipsoid(n, rng, shift=False, wide=False):
    a = _wide(n, rng) if wide else _scales(n, rng)
    centre = np.zeros(n)
    anchor = _shifted(centre, a, rng) if shift else centre.copy()
    truth = 0.5 * n * math.log(math.pi) - gammaln(0.5 * n + 1) + float(np.log(a).sum())
    return _ellipsoid_gauge(a, centre, anchor), anchor, LebesguePrior(), truth, a**-2


def gauss_ellipsoid(n, rng, shift=False, wide=False):
    """Prior N(0, I); the ellipsoid's centre is shifted from the origin (its offset in prior sd
    units c_j ~ N(0, 0.3²)), the anchor at the centre or half-way to the boundary."""
    a = 3e-3 * _wide(n, rng) if wide else 0.3 * _scales(n, rng)
    a = np.minimum(a, 3.0)
    centre = 0.3 * rng.standard_normal(n)
    anchor = _shifted(centre, a, rng) if shift else centre.copy()
    truth = log_cdf_exact(a**-2, centre, 1.0)  # σ = 1: λ_j = 1/a_j², δ_j = c_j
    return _ellipsoid_gauge(a, centre, anchor), anchor, GaussianPrior(1.0), truth, a**-2


def lp_ball(n, rng, p):
    a = _scales(n, rng)
    A = torch.as_tensor(a, dtype=DT)
    if math.isinf(p):
        def cost(theta):  # max|x/a|: homogeneous of degree 1
            return (theta / A).abs().amax(-1)
        truth = n * math.log(2) + float(np.log(a).sum())
    else:
        def cost(theta):  # Σ|x/a|^p: homogeneous of degree p along rays from the centre
            return ((theta / A).abs() ** p).sum(-1)
        truth = n * math.log(2) + float(np.log(a).sum()) + n * gammaln(1 + 1 / p) - gammaln(1 + n / p)
    return cost, np.zeros(n), LebesguePrior(), truth, a**-2


def box_gauss(n, rng):
    h = 0.5 * _scales(n, rng, 0.7)  # half-widths in prior sd units
    centre = 0.3 * h * rng.uniform(-1, 1, n)
    anchor = centre + 0.3 * h * rng.uniform(-1, 1, n)
    H, C, Q = (torch.as_tensor(x, dtype=DT) for x in (h, centre, anchor))
    up, down = C + H - Q, Q - (C - H)

    def cost(theta):  # the box's gauge about the anchor
        d = theta - Q
        return (d.clamp(min=0) / up + (-d).clamp(min=0) / down).amax(-1)

    upper, lower = (centre + h), (centre - h)
    # log(Φ(u) − Φ(l)) stably
    truth = float(np.sum(log_ndtr(upper) + np.log(-np.expm1(log_ndtr(lower) - log_ndtr(upper)))))
    return cost, anchor, GaussianPrior(1.0), truth, h**-2


def cross(n, rng):
    h = _scales(n, rng, 0.5)
    half = n // 2
    h1, h2 = h.copy(), h.copy()
    h1[:half] *= 3.0
    h2[half:] *= 3.0
    H1, H2 = torch.as_tensor(h1, dtype=DT), torch.as_tensor(h2, dtype=DT)

    def cost(theta):  # min of the two boxes' gauges: {C < 1} is their union
        return torch.minimum((theta.abs() / H1).amax(-1), (theta.abs() / H2).amax(-1))

    log_v1, log_v2, log_v12 = (float(np.sum(np.log(2 * x))) for x in (h1, h2, np.minimum(h1, h2)))
    truth = float(logsumexp([log_v1, log_v2, log_v12], b=[1, 1, -1]))
    return cost, np.zeros(n), LebesguePrior(), truth, np.minimum(h1, h2) ** -2


BODIES = {
    "ellipsoid": lambda n, rng: ellipsoid(n, rng),
    "ellipsoid-shift": lambda n, rng: ellipsoid(n, rng, shift=True),
    "ellipsoid-wide": lambda n, rng: ellipsoid(n, rng, wide=True),
    "gauss-ellipsoid": lambda n, rng: gauss_ellipsoid(n, rng),
    "gauss-ellipsoid-shift": lambda n, rng: gauss_ellipsoid(n, rng, shift=True),
    "gauss-ellipsoid-wide": lambda n, rng: gauss_ellipsoid(n, rng, wide=True),
    "l1": lambda n, rng: lp_ball(n, rng, 1.0),
    "l2": lambda n, rng: lp_ball(n, rng, 2.0),
    "l4": lambda n, rng: lp_ball(n, rng, 4.0),
    "linf": lambda n, rng: lp_ball(n, rng, math.inf),
    "l0.5": lambda n, rng: lp_ball(n, rng, 0.5),
    "box-gauss": box_gauss,
    "cross": cross,
}


def make(body: str, n: int, seed: int):
    """(cost, anchor (N,) float64 tensor, prior, truth nats, curvature (N,)) of body at N, seed.
    The random draws are those the coverage benchmark has always used for the bodies it had."""
    rng = np.random.default_rng([seed, n, sum(map(ord, body))])
    cost, anchor, prior, truth, curvature = BODIES[body](n, rng)
    return cost, torch.as_tensor(anchor, dtype=DT), prior, truth, curvature, rng
