"""Issue 9 ("trust"), small items: GaussianPrior's sigma checks and the n = 1 ray integral.

The n = 1 ray integral is checked against its closed form (a Gaussian integral), at a, b spanning
200 orders of magnitude, evaluated so that the reference itself neither overflows nor cancels.
"""
import math
import re

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy.special import erfcx, log_ndtr

import localvol as lv
from localvol.ray_integral import log_gaussian_ray_integral

# ------------------------------------------------------------------------------------------
# GaussianPrior(sigma): non-numeric sigma
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma,shown",
    [
        ("0.04", "str '0.04'"),
        (None, "NoneType None"),
        (["0.1", "0.2"], "list ['0.1', '0.2']"),
        ([[0.1, 0.2], "x"], "list [[0.1, 0.2], 'x']"),
        (b"0.04", "bytes b'0.04'"),
        ({"sigma": 0.04}, "dict {'sigma': 0.04}"),
        (True, "bool True"),
        (torch.tensor(True), "Tensor tensor(True)"),
        (1 + 2j, "complex (1+2j)"),
        (np.array(["0.1"]), "ndarray array(['0.1']"),
    ],
)
def test_gaussian_prior_rejects_non_numeric_sigma_naming_it(sigma, shown):
    want = "sigma must be a positive float or a 1-D tensor of standard deviations, got " + shown
    with pytest.raises(ValueError, match="^" + re.escape(want)):
        lv.GaussianPrior(sigma)


@pytest.mark.parametrize(
    "sigma", [0.04, 2, np.float64(0.04), np.float32(0.25), np.int64(3), torch.tensor(0.04),
              torch.tensor(3), np.array(0.5)]
)
def test_gaussian_prior_accepts_numeric_scalars(sigma):
    prior = lv.GaussianPrior(sigma)
    assert isinstance(prior.sigma, float)
    assert prior.sigma == pytest.approx(float(sigma), rel=1e-7)


def test_gaussian_prior_still_checks_values_and_vectors():
    with pytest.raises(ValueError, match="finite standard deviation > 0, got 0.0"):
        lv.GaussianPrior(np.float32(0.0))
    with pytest.raises(ValueError, match=r"sigma\[1\] = -0.5"):
        lv.GaussianPrior(np.array([0.1, -0.5]))
    vec = lv.GaussianPrior([0.1, 0.2, 0.3])  # a list of numbers is a vector of stds...
    assert vec.sigma.dtype == torch.float64  # ...kept in float64, not rounded to float32
    assert vec.sigma.tolist() == [0.1, 0.2, 0.3]


# ------------------------------------------------------------------------------------------
# log ∫_0^r exp(−a t²/2 + b t) dt  (n = 1) against the closed form
# ------------------------------------------------------------------------------------------


def _closed_form_n1(a, b, r):
    """log ∫_0^r exp(−a t²/2 + b t) dt = log( √(π/(2a)) e^{b²/(2a)} [erf(u) − erf(l)] ),
    l = −b/√(2a), u = (a r − b)/√(2a); for r = inf, erf(u) − erf(l) = erfc(−b/√(2a)).

    r = inf: float64 with scaled special functions, so nothing overflows or cancels:
    e^{b²/(2a)} erfc(−b/√(2a)) = erfcx(−b/√(2a)) for b ≤ 0, and
    log erfc(−b/√(2a)) = log 2 + log_ndtr(b/√a) for b > 0.
    Finite r: mpmath, with erf(u) − erf(l) written as a difference of erfc in the tails (no
    cancellation at 1 − 1), and enough digits for e^{b²/(2a)} to cancel against erfc's e^{−l²}
    and for erf(u) − erf(l) when r is tiny.
    """
    if math.isinf(r):
        base = 0.5 * math.log(math.pi / (2 * a))
        if b <= 0:
            return base + math.log(erfcx(-b / math.sqrt(2 * a)))
        return base + b * b / (2 * a) + math.log(2.0) + float(log_ndtr(b / math.sqrt(a)))
    biggest = b * b / (2 * a) + abs(b) * r + 0.5 * a * r * r  # nats that cancel, at most
    width = r * math.sqrt(a / 2)  # u − l: erf(u) and erf(l) share ~ −log10(u − l) digits
    with mp.workdps(40 + int(math.log10(1.0 + biggest)) + max(0, int(-math.log10(width)))):
        a_, b_, r_ = mp.mpf(a), mp.mpf(b), mp.mpf(r)
        k = mp.sqrt(2 * a_)
        l, u = -b_ / k, (a_ * r_ - b_) / k
        if l >= 0:  # both in the upper tail
            diff = mp.erfc(l) - mp.erfc(u)
        elif u <= 0:  # both in the lower tail
            diff = mp.erfc(-u) - mp.erfc(-l)
        else:  # the peak b/a inside [0, r]: a sum of positives
            diff = mp.erf(u) + mp.erf(-l)
        return float(b_ * b_ / (2 * a_) + mp.log(mp.sqrt(mp.pi / (2 * a_))) + mp.log(diff))


def _mpmath_n1(a, b, r):
    """Direct high-precision quadrature, split around the peak (moderate a, b only)."""
    with mp.workdps(40):
        a_, b_ = mp.mpf(a), mp.mpf(b)
        f = lambda t: mp.exp(-a_ * t * t / 2 + b_ * t)
        peak = max(b / a, 0.0)
        width = 1 / math.sqrt(a)
        pts = sorted({0.0, r} | {peak + k * width for k in range(-40, 41, 4) if 0 < peak + k * width < r})
        return float(mp.log(mp.quad(f, [mp.mpf(p) for p in pts])))


@pytest.mark.parametrize("a,b,r", [(1.0, -3.0, 0.4), (1.0, -3.0, math.inf), (1.0, 2.5, 0.7),
                                   (1.0, 2.5, 2.5), (1.0, 2.5, 6.0), (1.0, 2.5, math.inf),
                                   (0.01, 0.3, 5.0), (0.01, 0.3, math.inf), (30.0, -0.2, 0.05)])
def test_closed_form_reference_matches_mpmath(a, b, r):
    """The closed-form reference is itself right (each branch, moderate values)."""
    assert _closed_form_n1(a, b, r) == pytest.approx(_mpmath_n1(a, b, r), rel=1e-13, abs=1e-13)


_AS = (1e-100, 1e-12, 1.0, 1e12, 1e100)
_BS = (-1e50, -1e6, -1.0, -1e-30, 0.0, 1e-30, 1.0, 1e6, 1e50)


@pytest.mark.parametrize("a", _AS)
@pytest.mark.parametrize("b", _BS)
def test_n1_whole_ray_matches_closed_form(a, b):
    """Regression: a = 1e-100, b = 1e6 gave +inf (true value ≈ 5e111)."""
    got = log_gaussian_ray_integral(np.array([a]), np.array([b]), 1, np.array([np.inf]))
    assert got.shape == (1,) and np.isfinite(got[0])
    assert got[0] == pytest.approx(_closed_form_n1(a, b, math.inf), rel=1e-12, abs=1e-10)


def _finite_radii(a, b):
    """Radii around the scales of the integrand: the peak b/a (b > 0), at and just below it (the
    peak at the endpoint r, with b − a r cancelling), the Gaussian width, the decay length 1/|b|."""
    out = [1e-3 / math.sqrt(a), 3.0 / math.sqrt(a)]
    if b != 0:
        out.append(2.0 / abs(b))
    if b > 0:
        peak = b / a
        out += [1e-3 * peak, 0.5 * peak, float(np.nextafter(peak, 0.0)), peak, peak * (1 + 1e-9), 2.0 * peak]
    return out


_FINITE = [(a, b, r) for a in _AS for b in _BS for r in _finite_radii(a, b)]


@pytest.mark.parametrize("a,b,r", _FINITE)
def test_n1_finite_radius_matches_closed_form(a, b, r):
    got = log_gaussian_ray_integral(a, b, 1, r)
    assert np.isfinite(got)
    assert float(got) == pytest.approx(_closed_form_n1(a, b, r), rel=1e-12, abs=1e-10)


def test_n1_vectorised_call_matches_elementwise():
    """The regression case in a batch with ordinary ones: each row is its own integral."""
    a = np.array([1e-100, 1.0, 625.0, 1e-100])
    b = np.array([1e6, -3.0, 800.0, -1e6])
    r = np.array([np.inf, 2.0, np.inf, 1e-3])
    got = log_gaussian_ray_integral(a, b, 1, r)
    want = [_closed_form_n1(*x) for x in zip(a, b, r)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 10, 4810, 10**6])
@pytest.mark.parametrize("a,b", [(1e-60, 7e6), (1e-60, 5e20), (1e-100, 1e6), (0.3, 1e6)])
def test_radius_at_the_rounded_peak_is_finite(n, a, b):
    """r = the float64 peak t* (and its neighbours): b − a r cancels to rounding noise, whose
    sign can put the computed slope on the wrong side of the peak (it returned +inf for every n).
    The peak is ≥ 1e6 widths from 0, so the integral to r is half the whole-ray one, up to
    ~1e-32 relative: equal to the whole ray's within rounding."""
    m = n - 1
    t_star = (b + math.hypot(b, 2 * math.sqrt(a * m))) / (2 * a)  # root of −a t + b + m/t
    whole = float(log_gaussian_ray_integral(a, b, n, math.inf))
    for r in (np.nextafter(t_star, 0.0), t_star, np.nextafter(t_star, math.inf)):
        got = float(log_gaussian_ray_integral(a, b, n, r))
        assert math.isfinite(got)
        assert got == pytest.approx(whole, rel=1e-12)
