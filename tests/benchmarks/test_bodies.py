"""The truths the coverage benchmark judges the reference by (benchmarks/bodies.py,
benchmarks/gaussian_ellipsoid.py), each checked by an independent method: closed forms of the
chi-square family, scipy's non-central chi-square, and Monte Carlo counts of the bodies'
costs at small N (which also checks that each cost's star domain {C < 1} is the body)."""
import math
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bodies  # noqa: E402
from gaussian_ellipsoid import log_cdf_exact, log_cdf_saddlepoint, saddlepoint  # noqa: E402


@pytest.mark.parametrize("n, q", [(1, 0.1), (2, 0.1), (5, 0.5), (50, 5.0), (200, 20.0), (2000, 100.0)])
def test_exact_inversion_is_the_chi_square_cdf(n, q):
    # equal weights, central: Q = χ²_N, P(Q ≤ q) = P(N/2, q/2), the regularised lower incomplete
    # gamma function, in mpmath's arbitrary precision (far below float64's range at N = 2,000)
    mpmath.mp.dps = 40
    expected = float(mpmath.log(mpmath.gammainc(n / 2, 0, q / 2, regularized=True)))
    assert expected < (-1000 if n == 2000 else 0)
    assert log_cdf_exact(np.ones(n), None, q) == pytest.approx(expected, abs=1e-9, rel=1e-11)


@pytest.mark.parametrize("n, q, nc", [(1, 0.2, 1.0), (3, 0.5, 2.0), (10, 1.0, 5.0), (40, 10.0, 30.0)])
def test_exact_inversion_is_the_noncentral_chi_square_cdf(n, q, nc):
    lam, delta = np.full(n, 2.5), np.full(n, math.sqrt(nc / n))
    # Σ 2.5 (Z + δ)² ≤ q  ⇔  χ'²_N(nc) ≤ q / 2.5; the split of nc over the axes does not matter
    assert log_cdf_exact(lam, delta, q) == pytest.approx(stats.ncx2.logcdf(q / 2.5, n, nc), abs=1e-9)
    uneven = delta * np.sqrt(np.linspace(0.2, 1.8, n) / np.mean(np.linspace(0.2, 1.8, n)))
    assert log_cdf_exact(lam, uneven, q) == pytest.approx(stats.ncx2.logcdf(q / 2.5, n, nc), abs=1e-9)


def test_exact_inversion_matches_monte_carlo_with_unequal_weights():
    rng = np.random.default_rng(0)
    n, q = 6, 2.0
    lam, delta = np.exp(rng.standard_normal(n)), 0.5 * rng.standard_normal(n)
    z = rng.standard_normal((2_000_000, n))
    p = float(np.mean((((z + delta) ** 2) * lam).sum(1) <= q))
    se = math.sqrt((1 - p) / (p * len(z)))  # of log p
    assert abs(log_cdf_exact(lam, delta, q) - math.log(p)) < 4 * se


@pytest.mark.parametrize("n, tol", [(10, 0.02), (100, 3e-3), (1000, 5e-4), (4810, 1e-4)])
def test_saddlepoint_converges_to_the_exact_value(n, tol):
    # relative error O(1/N): far below the reference's interval (±0.05 nats and more) from N = 10
    rng = np.random.default_rng(n)
    lam, delta = np.exp(rng.standard_normal(n)) / 0.09, 0.3 * rng.standard_normal(n)
    exact = log_cdf_exact(lam, delta, 1.0)
    assert exact < -10
    assert abs(log_cdf_saddlepoint(lam, delta, 1.0) - exact) < tol


def test_saddlepoint_solves_its_equation_and_bad_input_is_refused():
    lam, delta = np.array([1.0, 4.0, 0.25]), np.array([0.3, 0.0, -1.0])
    t = saddlepoint(lam, delta, 0.5)
    a = 1 - 2 * t * lam
    assert t < 0 and np.sum(lam / a + delta**2 * lam / a**2) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="lower tail"):
        log_cdf_exact(lam, delta, 100.0)
    with pytest.raises(ValueError, match="weights"):
        log_cdf_exact(np.array([1.0, -1.0]), None, 0.5)


def _boundary_radii(cost, anchor, u, iterations=60):
    """r with C(anchor + r u) = 1 along each unit row of u: bisection in log r."""
    lo = torch.full((len(u),), -30.0, dtype=torch.float64)
    hi = torch.full((len(u),), 30.0, dtype=torch.float64)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        inside = cost(anchor + mid.exp()[:, None] * u) < 1.0
        lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
    return lo.exp()


@pytest.mark.parametrize("body", sorted(bodies.BODIES))
def test_each_body_truth_is_the_monte_carlo_measure_of_its_cost(body):
    # at N = 2 (3 for the two-box union, whose halves need an axis each): points uniform in a box
    # about the anchor that holds the body (found by bisection along 20,000 rays and the axes), the share with
    # C < 1 times the box's volume, each point weighted by the prior's density where it is Gaussian
    n = 3 if body == "cross" else 2
    cost, anchor, prior, truth, _, _ = bodies.make(body, n, seed=3)
    rng = np.random.default_rng(1)
    u = torch.as_tensor(rng.standard_normal((20_000, n)), dtype=torch.float64)
    u = torch.cat([u / u.norm(dim=1, keepdim=True), torch.eye(n, dtype=torch.float64), -torch.eye(n, dtype=torch.float64)])
    half = 1.2 * (_boundary_radii(cost, anchor, u)[:, None] * u).abs().amax(0)
    m = 1_000_000
    x = anchor + (2 * torch.rand(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) - 1) * half
    weight = (cost(x) < 1.0).double()
    if isinstance(prior, bodies.GaussianPrior):
        weight = weight * torch.exp(-0.5 * (x / prior.sigma).pow(2).sum(1)) / (2 * math.pi * prior.sigma**2) ** (n / 2)
    mean, sd = float(weight.mean()), float(weight.std())
    assert mean > 0
    se = sd / math.sqrt(m) / mean  # of the log
    assert se < 0.01
    assert abs(math.log(mean) + float(torch.log(2 * half).sum()) - truth) < 5 * se
