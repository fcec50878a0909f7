"""Eq. 19's Gaussian ray integral and the Lebesgue terms against mpmath in high precision."""
import math

import mpmath as mp
import numpy as np
import pytest

from localvol.ray_integral import log_gaussian_ray_integral, log_unit_ball_volume, log_unit_sphere_area

mp.mp.dps = 40


def _peak(a, b, n):
    m = n - 1
    if m == 0:
        return max(b / a, 0.0)
    return (b + math.sqrt(b * b + 4 * a * m)) / (2 * a)


def _reference_b0(a, n, r):
    """∫_0^r t^(n−1) exp(−a t²/2) dt = ½ (2/a)^(n/2) γ(n/2, a r²/2) (lower incomplete gamma)."""
    a_, n_ = mp.mpf(a), mp.mpf(n)
    s = n_ / 2
    x = mp.inf if math.isinf(r) else a_ * mp.mpf(r) ** 2 / 2
    if x > s:  # via the upper incomplete gamma (continued fraction): no cancellation here
        lower = mp.gamma(s) - mp.gammainc(s, x, mp.inf)
    else:
        try:  # series; converges fast unless x is close to s
            lower = mp.gammainc(s, 0, x)
        except mp.libmp.libhyper.NoConvergence:
            return _reference_quad(a, 0.0, n, r)
    return float(mp.log(mp.mpf(0.5)) + s * mp.log(2 / a_) + mp.log(lower))


def _reference_inf(a, b, n):
    """∫_0^∞ t^(n−1) exp(−a t²/2 + b t) dt = Γ(n) a^(−n/2) e^(b²/(4a)) D_(−n)(−b/√a)."""
    a, b, n = mp.mpf(a), mp.mpf(b), mp.mpf(n)
    return float(mp.loggamma(n) - n / 2 * mp.log(a) + b * b / (4 * a) + mp.log(mp.pcfd(-n, -b / mp.sqrt(a))))


def _reference_quad(a, b, n, r):
    """Direct tanh-sinh quadrature, split at a fine grid around the integrand's peak."""
    a, b, n = mp.mpf(a), mp.mpf(b), mp.mpf(n)
    tp = min(mp.mpf(_peak(float(a), float(b), float(n))), mp.mpf(r))
    width = 1 / mp.sqrt(a + ((n - 1) / tp**2 if tp > 0 else 0))
    g = lambda t: -a * t * t / 2 + b * t + ((n - 1) * mp.log(t) if n > 1 else 0)
    g_peak = g(tp)
    f = lambda t: mp.exp(g(t) - g_peak) if (t > 0 or n == 1) else mp.mpf(0)
    pts = sorted({mp.mpf(0), mp.mpf(r)} | {tp + k * width for k in range(-60, 61, 2) if 0 < tp + k * width < r})
    return float(mp.log(mp.quad(f, pts)) + g_peak)


B0_GRID = [
    (a, n, f)
    for a in (1.0, 1 / 0.04**2)
    for n in (2, 3, 10, 1000, 4810, 1e6, 3.4e7, 1e10)
    for f in (1e-6, 0.3, 0.99, 1.0, 1.05, 3.0, math.inf)
]


@pytest.mark.parametrize("a,n,f", B0_GRID)
def test_zero_offset_matches_incomplete_gamma(a, n, f):
    r = f * math.sqrt((n - 1) / a)
    got = log_gaussian_ray_integral(a, 0.0, n, r)
    want = _reference_b0(a, n, r)
    assert got == pytest.approx(want, rel=1e-11, abs=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 1000])
@pytest.mark.parametrize("b", [-30.0, -2.0, -0.1, 0.0, 0.5, 4.0, 40.0])
def test_whole_ray_matches_parabolic_cylinder(n, b):
    a = 1.7
    got = log_gaussian_ray_integral(a, b, n, math.inf)
    assert got == pytest.approx(_reference_inf(a, b, n), rel=1e-11, abs=1e-9)


QUAD_GRID = [
    (a, b, n, f)
    for a, b in ((1.0, -3.0), (1.0, 2.5), (0.5, -0.02), (625.0, 800.0), (625.0, -4000.0))
    for n in (1, 2, 5, 100, 4810, 1e6)
    for f in (1e-8, 0.5, 1.0, 2.0)
]


@pytest.mark.parametrize("a,b,n,f", QUAD_GRID)
def test_offsets_both_signs_match_quadrature(a, b, n, f):
    r = f * (_peak(a, b, n) or 1.0)
    got = log_gaussian_ray_integral(a, b, n, r)
    assert got == pytest.approx(_reference_quad(a, b, n, r), rel=1e-10, abs=1e-9)


def test_tiny_and_huge_radii_and_vectorised():
    a = np.array([1.0, 1.0, 2.0, 0.3])
    b = np.array([0.0, 5.0, -1e3, 1e-3])
    r = np.array([1e-200, 1e-30, 1e5, np.inf])
    n = 4810
    got = log_gaussian_ray_integral(a, b, n, r)
    assert got.shape == (4,) and np.all(np.isfinite(got))
    # tiny r: ∫ ≈ r^n / n exactly up to exp(b r)
    assert got[0] == pytest.approx(n * math.log(1e-200) - math.log(n), rel=1e-13)
    assert got[1] == pytest.approx(n * math.log(1e-30) - math.log(n), rel=1e-13)
    assert got[2] == pytest.approx(_reference_quad(2.0, -1e3, n, 1e5), rel=1e-10)
    assert got[3] == pytest.approx(_reference_inf(0.3, 1e-3, n), rel=1e-10)


def test_sphere_area_and_ball_volume_closed_forms():
    assert math.exp(log_unit_sphere_area(2)) == pytest.approx(2 * math.pi)
    assert math.exp(log_unit_sphere_area(3)) == pytest.approx(4 * math.pi)
    assert math.exp(log_unit_ball_volume(3)) == pytest.approx(4 / 3 * math.pi)
    n = 1e10
    assert log_unit_ball_volume(n) == pytest.approx(float(n / 2 * mp.log(mp.pi) - mp.loggamma(n / 2 + 1)), rel=1e-14)
    assert log_unit_sphere_area(n) - log_unit_ball_volume(n) == pytest.approx(math.log(n), abs=1e-4)  # ~1e11 − ~1e11


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(a=0.0, b=0.0, n=3, r=1.0), "a must"),
        (dict(a=1.0, b=np.nan, n=3, r=1.0), "b must"),
        (dict(a=1.0, b=0.0, n=0.5, r=1.0), "n must"),
        (dict(a=1.0, b=0.0, n=3, r=-1.0), "r must"),
        (dict(a=1.0, b=0.0, n=3, r=np.nan), "r must"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_gaussian_ray_integral(**kwargs)


@pytest.mark.parametrize("b", [1e-200, 1e-158, 1e-30])
def test_n1_with_tiny_positive_offset(b):
    """Regression: A = b²/a underflowed and the window never closed (NaN or 0.0)."""
    got = log_gaussian_ray_integral(1.0, b, 1, 1.0)
    assert got == pytest.approx(math.log(math.sqrt(math.pi / 2) * math.erf(1 / math.sqrt(2))), rel=1e-10)


def test_huge_offset_does_not_overflow():
    # log ∫ t e^(−t²/2 + b t) dt ≈ b²/2 + log(b √(2π)) for huge b (b² itself overflows)
    got = log_gaussian_ray_integral(1.0, 1e150, 2, math.inf)
    assert got == pytest.approx(0.5e300, rel=1e-12)


def test_non_integer_dimension_is_refused():
    with pytest.raises(ValueError, match="integer"):
        log_gaussian_ray_integral(1.0, 0.0, 2.5, 1.0)
