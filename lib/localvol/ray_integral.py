"""The one-dimensional integrals along a ray: paper eq. 7-9 (Lebesgue) and eq. 19 (Gaussian).

Everything here works in float64 NumPy on per-sample scalars (a few per direction), so it is
independent of where the model lives.

The Gaussian ray integral of eq. 19 is, after expanding the prior's quadratic along the ray
θ(t) = θ0 + t·d (see :func:`log_gaussian_ray_integral`),

    log ∫_0^r exp(−a t²/2 + b t) t^(n−1) dt,      a > 0, b real, n ≥ 1, 0 < r ≤ ∞.

Its log-integrand g(t) = −a t²/2 + b t + (n−1) log t is concave, so the integrand is unimodal.
We locate its maximum on [0, r] in closed form, bracket the region where g is within
``_WINDOW_NATS`` of that maximum by bisection, and integrate exp(g − max g) there with
composite Gauss–Legendre quadrature in a coordinate scaled to the peak. Unlike the paper's
second-order (Laplace-type) expansion this has no approximation error to check and no
hard failures: it is accurate to ~1e-12 relative from n = 1 to n = 1e10, for tiny and
infinite r and offsets of either sign (tested against mpmath).
"""
from __future__ import annotations

import numpy as np
from scipy.special import gammaln, roots_legendre

__all__ = [
    "log_unit_sphere_area",
    "log_unit_ball_volume",
    "log_gaussian_ray_integral",
]

# The window holds every t with g(t) ≥ max g − 46, i.e. all but ~1e-20 of the mass.
_WINDOW_NATS = 46.0
_PANELS = 12
_NODES = 32
_BISECTIONS = 80
_GL_X, _GL_W = roots_legendre(_NODES)


def log_unit_sphere_area(n: int | float) -> float:
    """log |S^(n−1)| = log(2 π^(n/2) / Γ(n/2)), the surface area of the unit sphere in R^n.

    Paper eq. 9 (the factor in front of the Monte Carlo average). Natural log. Uses
    scipy's log-gamma, so it is finite for any n ≥ 1 (e.g. n = 1e10).

    Raises:
        ValueError: if n < 1 or not finite.
    """
    n = float(n)
    if not np.isfinite(n) or n < 1:
        raise ValueError(f"n must be a finite number ≥ 1, got {n!r}")
    return float(np.log(2.0) + 0.5 * n * np.log(np.pi) - gammaln(0.5 * n))


def log_unit_ball_volume(n: int | float) -> float:
    """log V_n = log(π^(n/2) / Γ(n/2 + 1)) = log|S^(n−1)| − log n (paper eq. 8-9). Natural log.

    Raises:
        ValueError: if n < 1 or not finite.
    """
    n = float(n)
    if not np.isfinite(n) or n < 1:
        raise ValueError(f"n must be a finite number ≥ 1, got {n!r}")
    return float(0.5 * n * np.log(np.pi) - gammaln(0.5 * n + 1.0))


def log_gaussian_ray_integral(a, b, n, r):
    """log ∫_0^r exp(−a t²/2 + b t) t^(n−1) dt, elementwise (the ray integral of eq. 19).

    Along the ray θ(t) = θ0 + t·d̂ (unit d̂) the isotropic prior N(0, σ²I) has
    −|θ(t)|²/(2σ²) = −|θ0|²/(2σ²) − t (d̂·θ0)/σ² − t²/(2σ²), so eq. 19's integral is this
    function with a = 1/σ², b = −(d̂·θ0)/σ² (for per-coordinate σ_j: a = Σ d̂_j²/σ_j²,
    b = −Σ d̂_j θ0_j/σ_j²), times exp(−|θ0/σ|²/2) and the normaliser.

    Args:
        a: array-like (B,), float64, > 0. Quadratic coefficient (1/length²).
        b: array-like (B,), float64, any sign. Linear coefficient (1/length).
        n: integer ≥ 1 (the dimension N; t^(n−1) is the radial Jacobian). Up to ~1e15.
        r: array-like (B,), float64, in (0, inf]. Upper limit (the radius, length units).

    Returns:
        np.ndarray (B,), float64: the natural log of the integral, assembled in log space (no
        overflow for any n, a, b of practical size, e.g. a ≥ 1e-100, |b| ≤ 1e100).

    Raises:
        ValueError: if any a ≤ 0 or non-finite, b non-finite, r ≤ 0 or NaN, or n is not an
            integer ≥ 1.
    """
    a, b, r = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (a, b, r)))
    shape = a.shape
    a, b, r = (np.ravel(x).copy() for x in (a, b, r))
    n = float(n)
    if not np.isfinite(n) or n < 1 or n != round(n):
        raise ValueError(f"n must be an integer ≥ 1 (the dimension), got {n!r}")
    if np.any(~np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"a must be finite and > 0, got {a[~(np.isfinite(a) & (a > 0))][:5]}")
    if np.any(~np.isfinite(b)):
        raise ValueError(f"b must be finite, got {b[~np.isfinite(b)][:5]}")
    if np.any(np.isnan(r)) or np.any(r <= 0):
        raise ValueError(f"r must be > 0 (inf allowed), got {r[~(r > 0)][:5]}")
    m = n - 1.0
    # Maximiser of g on [0, inf): root of −a t + b + m/t = 0, written to avoid cancellation
    # (for n = 1 it is max(b/a, 0)).
    disc = np.hypot(b, 2.0 * np.sqrt(a * m))  # sqrt(b² + 4am) without overflow
    with np.errstate(divide="ignore", invalid="ignore"):
        t_star = np.where(b >= 0, (b + disc) / (2.0 * a), 2.0 * m / (disc - b))
    t_star = np.where(np.isfinite(t_star), t_star, 0.0)
    tp = np.minimum(t_star, r)  # peak of the integrand on [0, r]
    # Slope of the quadratic part at the peak, b − a tp (nats per unit t). Its error times the
    # window's width in t must stay well below a nat, so it must be accurate relative to itself,
    # not just to b: for a = 1e-100, b = 1e6 the rounding error of a·tp, ~1e-16 b = 1e-10, over a
    # window ~1e51 wide gave Δg ~ +1e41 nats, and exp overflowed (log ∫_0^∞ exp(−a t²/2 + b t) dt
    # came out +inf instead of ≈ 5e111). So:
    # - at an interior peak, g'(tp) = 0 gives b − a tp = −m/tp exactly (0 for n = 1, b > 0);
    # - at the endpoint tp = r, b − a r is computed with an exact product (_b_minus_at);
    # - if that exact g'(r) is ≤ 0 although t_star ≥ r, the true maximum lies within rounding of
    #   t_star below r: the peak is interior (g'(tp) = 0), up to a change of g of relative size
    #   ~1e-32.
    with np.errstate(divide="ignore", invalid="ignore"):
        tp_pos = np.where(tp > 0, tp, 1.0)
        slope_exact = _b_minus_at(b, a, tp)
        g_prime_r = slope_exact + np.where(tp > 0, m / tp_pos, 0.0)
        interior = (tp > 0) & ((t_star < r) | (g_prime_r <= 0))
        slope = np.where(interior, -m / tp_pos, slope_exact)
    # Scaled coordinate t = tp + s y with s = tp (for n = 1, where there is no log term, the
    # shortest of r, the Gaussian width 1/√a and the decay length 1/|b − a tp| at the peak):
    # Δg(y) = g(t) − g(tp) is then computed without cancellation (see _delta_g).
    with np.errstate(divide="ignore"):
        s = tp if m > 0 else np.minimum(np.minimum(r, 1.0 / np.sqrt(a)), 1.0 / np.abs(slope))
    A = a * s * s
    C = slope * s  # (b − a tp) s
    ratio = np.where(tp > 0, s / np.where(tp > 0, tp, 1.0), 0.0)

    def below_window(y):
        return _delta_g(y, A, C, m, ratio) <= -_WINDOW_NATS

    # Left edge in [−tp/s, 0] (t ≥ 0); for n > 1, Δg → −inf at t = 0, so it is bracketed.
    y_min = -tp / s
    y_left = np.where(below_window(y_min), _bisect(below_window, np.zeros_like(A), y_min), y_min)
    # Right edge in [0, (r − tp)/s]: double until below the window or at the end of the ray.
    y_max = (r - tp) / s  # 0 when the peak is the endpoint r; inf when r = inf
    y_hi = np.minimum(1.0, y_max)
    for _ in range(1100):
        grow = ~below_window(y_hi) & (y_hi < y_max)
        if not grow.any():
            break
        y_hi = np.where(grow, np.minimum(2.0 * y_hi, y_max), y_hi)
    y_right = np.where(below_window(y_hi), _bisect(below_window, np.zeros_like(A), y_hi), y_hi)

    # Composite Gauss–Legendre of exp(Δg(y)) over [y_left, y_right]; dt = tp dy.
    edges = np.linspace(0.0, 1.0, _PANELS + 1)
    width = (y_right - y_left)[:, None]  # (B, 1)
    half = 0.5 * width / _PANELS  # (B, 1)
    centres = y_left[:, None] + width * (edges[None, :-1] + 0.5 / _PANELS)  # (B, P)
    nodes = centres[..., None] + half[..., None] * _GL_X  # (B, P, Q)
    vals = np.exp(_delta_g(nodes, *(x[:, None, None] for x in (A, C)), m, ratio[:, None, None]))
    quad = np.sum(vals * _GL_W, axis=(1, 2)) * half[:, 0]

    with np.errstate(divide="ignore", invalid="ignore"):
        g_peak = -0.5 * a * tp * tp + b * tp + np.where(m > 0, m * np.log(tp), 0.0)
    return (np.log(s) + g_peak + np.log(quad)).reshape(shape)


def _b_minus_at(b, a, t):
    """b − a·t accurate to ~1e-16 of |b − a·t| itself, elementwise (float64 arrays, one shape).

    a·t is split exactly into p + err (Dekker's product with Veltkamp's splitting), so when
    b ≈ a·t the difference is not swamped by the rounding error of a·t (~1e-16 |b|): b − p is
    then exact (Sterbenz) and only the final subtraction rounds. Where the splitting overflows
    (|a| or |t| beyond ~1e300) it falls back to the plain b − a·t.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        p = a * t

        def split(x):  # x = hi + lo with hi holding the top 26 bits: hi·hi is exact
            c = 134217729.0 * x  # 2^27 + 1
            hi = c - (c - x)
            return hi, x - hi

        a_hi, a_lo = split(a)
        t_hi, t_lo = split(t)
        err = ((a_hi * t_hi - p) + a_hi * t_lo + a_lo * t_hi) + a_lo * t_lo  # a·t − p, exactly
        out = (b - p) - err
    return np.where(np.isfinite(out), out, b - p)


def _delta_g(y, A, C, m, ratio):
    """g(tp + s y) − g(tp) = −A y²/2 + C y + m log1p(y s/tp), A = a s², C = (b − a tp) s."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_term = m * np.log1p(y * ratio) if m > 0 else 0.0
        return -0.5 * A * y * y + C * y + log_term


def _bisect(is_outside, y_in, y_out):
    """Vectorised bisection for the window edge between y_in = 0 (inside) and y_out (outside).

    Bisects |y| geometrically (between 1e-300 and |y_out|): peak widths range from ~1e-150 to
    ~1e150 in y units, beyond the reach of a linear bisection.
    """
    sign = np.sign(y_out)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.full_like(y_out, np.log(1e-300))  # log|y| inside the window
        hi = np.log(np.abs(y_out))  # log|y| outside
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            out = is_outside(sign * np.exp(mid))
            lo = np.where(out, lo, mid)
            hi = np.where(out, mid, hi)
        return sign * np.exp(hi)
