"""The Gaussian measure of an ellipsoid: log P(Q ≤ q) for Q = Σ_j λ_j (Z_j + δ_j)², Z ~ N(0, I).

A point x ~ N(0, σ² I) lies in the ellipsoid Σ_j (x_j − c_j)² / a_j² ≤ 1 exactly when
Q = Σ_j (σ²/a_j²) (Z_j − c_j/σ)² ≤ 1: a weighted sum of non-central chi-square variables with
weights λ_j = σ²/a_j² and non-centralities δ_j² = c_j²/σ². The sign of δ_j does not matter.

Two methods, both in nats and stable for probabilities far below float64's range (e^-10^5):

- :func:`log_cdf_saddlepoint`: the second-order saddle-point tail (Lugannani & Rice 1980, in
  Barndorff-Nielsen's r* form, Φ(r*) with r* = w + log(u/w)/w), relative error O(1/N);
- :func:`log_cdf_exact`: the inversion integral of the Laplace transform along the vertical
  line through the saddle point (steepest descent, e.g. Daniels 1987; Butler, "Saddlepoint
  Approximations with Applications", 2007, §1.2),

      P(Q ≤ q) = (1/2π) ∫ Re[ exp(K(t̂ + iy) − (t̂ + iy) q) / (−(t̂ + iy)) ] dy,   t̂ < 0,

  K the cumulant generating function; exact up to quadrature (checked against the chi-square
  closed form, scipy's non-central chi-square and Monte Carlo in tests/benchmarks/).

Both need q below E[Q] = Σ λ_j (1 + δ_j²), the lower tail where the saddle point t̂ is negative
(every ellipsoid whose prior mass is below about one half).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import integrate, optimize
from scipy.special import log_ndtr

__all__ = ["log_cdf_saddlepoint", "log_cdf_exact", "saddlepoint"]


def _check(lam, delta, q):
    lam = np.asarray(lam, dtype=np.float64)
    delta = np.zeros_like(lam) if delta is None else np.broadcast_to(np.asarray(delta, dtype=np.float64), lam.shape)
    if lam.ndim != 1 or lam.size == 0 or not np.all(np.isfinite(lam) & (lam > 0)):
        raise ValueError("lam must be a non-empty 1-D array of finite weights > 0")
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta must be finite")
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"q must be finite and > 0, got {q!r}")
    mean = float(np.sum(lam * (1 + delta**2)))
    if q >= mean:
        raise ValueError(f"q = {q:g} is not below E[Q] = {mean:g}: only the lower tail is implemented")
    return lam, delta * delta


def _cgf(t, lam, d2):
    """K(t), K'(t), K''(t) for real t < 1/(2 max λ)."""
    a = 1.0 - 2.0 * t * lam
    k0 = float(np.sum(-0.5 * np.log(a) + d2 * lam * t / a))
    k1 = float(np.sum(lam / a + d2 * lam / a**2))
    k2 = float(np.sum(2 * lam**2 / a**2 + 4 * d2 * lam**2 / a**3))
    return k0, k1, k2


def saddlepoint(lam, delta, q) -> float:
    """The t̂ < 0 with K'(t̂) = q (K' increases from 0 at −∞ to E[Q] at 0)."""
    lam, d2 = _check(lam, delta, q)
    f = lambda t: _cgf(t, lam, d2)[1] - q
    # K'(t) ≤ Σ λ(1+δ²)/(1−2tλ) ≤ E[Q]·max over j..., bracket by doubling
    lo = -1.0 / (2.0 * lam.max())
    while f(lo) > 0:
        lo *= 2.0
        if lo < -1e300:
            raise ValueError("no saddle point found")
    return optimize.brentq(f, lo, 0.0, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


def log_cdf_saddlepoint(lam, delta, q) -> float:
    """log P(Q ≤ q), nats: Lugannani-Rice in r* form (module docstring)."""
    lam_, d2 = _check(lam, delta, q)
    t = saddlepoint(lam, delta, q)
    k0, _, k2 = _cgf(t, lam_, d2)
    w = -math.sqrt(max(2.0 * (t * q - k0), 0.0))
    u = t * math.sqrt(k2)
    if w == 0.0:
        return math.log(0.5)
    return float(log_ndtr(w + math.log(u / w) / w))


def log_cdf_exact(lam, delta, q, rel: float = 1e-10) -> float:
    """log P(Q ≤ q), nats: the inversion integral through the saddle point (module docstring).

    The integrand is exp(K(t̂+iy) − K(t̂) − iyq) / (−(t̂+iy)), even in y for its real part,
    peaked at y = 0 with width 1/√K''(t̂) and decaying like |y|^(−N/2−1)."""
    lam, d2 = _check(lam, delta, q)
    t = saddlepoint(lam, delta, q)
    k0, _, k2 = _cgf(t, lam, d2)
    width = 1.0 / math.sqrt(k2)

    def g(y):  # exp(K(t̂+iy) − K(t̂)) / (−(t̂+iy)): slowly varying; the oscillation is e^(−iyq)
        z = complex(t, y)
        a = 1.0 - 2.0 * z * lam
        return np.exp(np.sum(-0.5 * np.log(a) + d2 * lam * z / a) - k0) / (-z)

    def integrand(y):
        return (g(y) * complex(math.cos(y * q), -math.sin(y * q))).real

    # the peak (almost all the mass) in pieces of growing width, then the oscillating tail as a
    # Fourier integral (QUADPACK's QAWF): Re[g e^(−iyq)] = Re g cos(qy) + Im g sin(qy)
    total, edges = 0.0, [0.0] + [width * 2.0**j for j in range(-2, 7)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        piece, _ = integrate.quad(integrand, lo, hi, epsabs=rel * abs(total), epsrel=rel, limit=200)
        total += piece
    tail_cos, _ = integrate.quad(lambda y: g(y).real, edges[-1], np.inf, weight="cos", wvar=q,
                                 epsabs=rel * abs(total), limlst=200)
    tail_sin, _ = integrate.quad(lambda y: g(y).imag, edges[-1], np.inf, weight="sin", wvar=q,
                                 epsabs=rel * abs(total), limlst=200)
    total += tail_cos + tail_sin
    value = total / math.pi  # 2 ∫_0^∞ / (2π)
    if not value > 0:
        raise ValueError("the inversion integral did not converge to a positive probability")
    return k0 - t * q + math.log(value)
