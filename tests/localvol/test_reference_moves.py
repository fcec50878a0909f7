"""The reference's MCMC moves and budgets: invariance of the lifted pCN kernel for every tail
exponent, the shape fit, adaptive move counts, warm-started searches and evaluation counts."""
import math

import numpy as np
import pytest
import torch

from localvol import LebesguePrior, QuadraticCost, estimate_log_volume_reference
from localvol.directions import sample_directions
from localvol.estimator import VolumeRun
from localvol.radius import find_radius
from localvol.reference import KAPPAS, _fit_shape, _Sampler

DT = torch.float64


def _ball_sampler(n, M):
    cost = QuadraticCost(torch.eye(n, dtype=DT), torch.zeros(n, dtype=DT))
    base = VolumeRun(cost, torch.zeros(n, dtype=DT), cutoff=0.5, n_samples=1, prior=LebesguePrior(),
                     preconditioner=None, rtol=1e-6, batch_size=M, seed=0, max_radius=None)
    return _Sampler(base, M, (1, 1), 0.5, 10, M, 0)


@pytest.mark.parametrize("kappa", [0.5, 1.0, 2.52])
def test_move_leaves_the_uniform_distribution_invariant_at_beta_zero(kappa):
    # at β = 0 the target is the uniform distribution on the sphere whatever the reference: an
    # anisotropic reference (scales 3 : 1 : 1 : 1/3) must not pull the particles to its long
    # axis. Uniform on S^3: E u_j² = 1/4, E u_j⁴ = 1/8 (sd of the mean of u² over 4,000
    # particles 0.004). A kernel without the |u|^(1/κ−1) Jacobian or with the wrong power of S
    # moves E u_0² by more than 0.1 within these moves.
    n, M = 4, 4000
    smc = _ball_sampler(n, M)
    z = sample_directions(n, range(M), seed=1, dtype=DT, device="cpu")
    logw, radius, _, exponent = smc.weights(z, None)
    c = np.array([9.0, 1.0, 1.0, 1 / 9])
    rng = np.random.default_rng(3)
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):
        z, logw, radius, exponent, acc, _ = smc.move(z, logw, radius, exponent, 0.0, (kappa, c), 0.5, gen, rng)
    u2 = (z**2).mean(0).numpy()
    u4 = (z**4).mean(0).numpy()
    assert np.abs(u2 - 0.25).max() < 0.02, u2
    assert np.abs(u4 - 0.125).max() < 0.02, u4
    assert 0.1 < acc < 0.95  # the moves did move (a broken kernel fails the moments above)


def test_fit_shape_recovers_the_tail_exponent_and_scales():
    rng = np.random.default_rng(0)
    n, M = 50, 4000
    sd = np.exp(rng.standard_normal(n))
    sd /= np.exp(np.log(sd).mean())
    for kappa in (1.0, 2.0):
        g = rng.standard_normal((M, n))
        y = sd * np.sign(g) * np.abs(g) ** kappa
        z = torch.as_tensor(y / np.linalg.norm(y, axis=1, keepdims=True))
        k_fit, c_fit = _fit_shape(z, (1.0, np.ones(n)))
        assert k_fit == pytest.approx(kappa, rel=1e-12), (kappa, k_fit, KAPPAS)
        assert np.abs(0.5 * np.log(c_fit) - np.log(sd)).max() < 0.15


def test_cost_evaluations_are_counted_exactly(tmp_path):
    n = 8
    cost = QuadraticCost(torch.diag(torch.linspace(0.5, 2.0, n, dtype=DT)), torch.zeros(n, dtype=DT))
    calls = {"points": 0}

    def counted(theta):
        calls["points"] += len(theta)
        return cost(theta)

    args = dict(cutoff=0.5, prior=LebesguePrior(), seed=1, n_particles=16, n_runs=4, n_moves=1, n_pilots=1,
                progress=False)
    anchor = torch.zeros(n, dtype=DT, device="cpu")
    for checkpoint in (None, tmp_path / "ref.npz"):
        calls["points"] = 0
        ref = estimate_log_volume_reference(counted, anchor, checkpoint_path=checkpoint, **args)
        assert ref.cost_evaluations == calls["points"], checkpoint


def test_moves_per_step_lie_between_n_moves_and_max_moves():
    n = 10
    axes = torch.exp(torch.linspace(-1, 1, n, dtype=DT))
    cost = QuadraticCost(torch.diag(axes**-2), torch.zeros(n, dtype=DT))
    anchor = torch.zeros(n, dtype=DT, device="cpu")
    ref = estimate_log_volume_reference(cost, anchor, cutoff=0.5, prior=LebesguePrior(), n_particles=32,
                                        n_moves=2, max_moves=5, n_pilots=0, progress=False)
    for run in ref.runs:
        assert run.moves.min() >= 2 and run.moves.max() <= 5
        assert len(run.moves) == run.n_temperatures
    assert ref.meta["max_moves"] == 5
    with pytest.raises(ValueError, match="max_moves"):
        estimate_log_volume_reference(cost, anchor, cutoff=0.5, prior=LebesguePrior(), n_moves=4, max_moves=3,
                                      progress=False)


def test_a_known_exponent_finds_a_homogeneous_crossing_in_two_evaluations():
    # C = |x|^p along every ray: from any first radius, one power-law step with the right p
    # lands on the crossing, so the search stops at its second evaluation; p = 2 needs more
    # for p ≠ 2; and the search reports the exponent it measured
    n, p = 6, 1.0
    d = sample_directions(n, range(5), seed=0, dtype=DT, device="cpu")

    def cost(theta):
        return torch.linalg.vector_norm(theta, dim=1) ** p

    anchor = torch.zeros(n, dtype=DT, device="cpu")
    r0 = np.array([0.1, 0.5, 2.0, 3.0, 7.0])
    known = find_radius(cost, anchor, d, cutoff=1.0, rtol=1e-6, initial_radius=r0, initial_exponent=p)
    default = find_radius(cost, anchor, d, cutoff=1.0, rtol=1e-6, initial_radius=r0)
    assert known.evaluations.tolist() == [2] * 5
    assert (default.evaluations > 2).all()
    np.testing.assert_allclose(known.radius, 1.0, rtol=1e-6)
    np.testing.assert_allclose(default.exponent, p, rtol=1e-6)


# -- Langevin moves (moves="langevin") --------------------------------------------------------

def _langevin_sampler(n, M, prior, anchor, preconditioner=None):
    A = torch.diag(torch.exp(torch.linspace(-1.0, 1.0, n, dtype=DT))) + 0.1  # not diagonal
    cost = QuadraticCost(A, anchor)
    base = VolumeRun(cost, anchor, cutoff=0.5, n_samples=1, prior=prior, preconditioner=preconditioner,
                     rtol=1e-12, batch_size=M, seed=0, max_radius=None)
    return _Sampler(base, M, (1, 1), 0.5, 10, M, 0, "langevin")


@pytest.mark.parametrize("gaussian", [False, True])
def test_log_weight_gradient_is_the_finite_difference_of_the_log_weight(gaussian):
    # implicit differentiation at the crossing, the ray integral's moments and the
    # preconditioner's chain rule against central differences of log w along tangent directions
    from localvol import DiagonalPreconditioner, GaussianPrior
    n, M = 6, 64
    gen = torch.Generator().manual_seed(0)
    anchor = 0.3 * torch.randn(n, generator=gen, dtype=DT) if gaussian else torch.zeros(n, dtype=DT)
    prior = GaussianPrior(0.7) if gaussian else LebesguePrior()
    pre = DiagonalPreconditioner(torch.exp(torch.linspace(0, 1, n, dtype=DT)), eps=0.0, exponent=0.5)
    smc = _langevin_sampler(n, M, prior, anchor, pre)
    z = torch.randn(M, n, generator=gen, dtype=DT)
    z = z / z.norm(dim=1, keepdim=True)
    logw, radius, _, _ = smc.weights(z, None)
    grad, evals = smc.log_weight_gradients(z, radius)
    assert evals == M
    e = torch.randn(M, n, generator=gen, dtype=DT)
    e = e - (e * z).sum(1, keepdim=True) * z
    h = 1e-6
    plus, minus = (z + h * e), (z - h * e)
    log_plus = smc.weights(plus / plus.norm(dim=1, keepdim=True), None)[0]
    log_minus = smc.weights(minus / minus.norm(dim=1, keepdim=True), None)[0]
    numeric = (log_plus - log_minus) / (2 * h)
    analytic = (torch.as_tensor(grad) * e).sum(1).numpy()
    assert np.abs(numeric).min() > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(analytic, numeric, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kappa", [1.0, 0.7])
def test_langevin_move_leaves_the_final_target_invariant(kappa):
    # exact draws from τ_1 of the ellipsoid Σ(x/a)² < c (the angular central Gaussian of diag a²)
    # stay τ_1 under 15 Langevin moves with a mismatched reference shape: E u_j² within sampling
    # noise (sd ≤ 0.014 here). A proposal without its drift in the reverse density, or with the
    # drift's sign flipped, moves E u_j² by more than 0.03 in these moves.
    n, M = 5, 4000
    a = np.exp(np.linspace(-0.8, 0.8, n))
    cost = QuadraticCost(torch.diag(torch.as_tensor(a**-2)), torch.zeros(n, dtype=DT))
    base = VolumeRun(cost, torch.zeros(n, dtype=DT), cutoff=0.5, n_samples=1, prior=LebesguePrior(),
                     preconditioner=None, rtol=1e-10, batch_size=M, seed=0, max_radius=None)
    smc = _Sampler(base, M, (1, 1), 0.5, 10, M, 0, "langevin")
    rng = np.random.default_rng(0)
    big = rng.standard_normal((400_000, n)) * a
    exact = ((big / np.linalg.norm(big, axis=1, keepdims=True)) ** 2).mean(0)
    y = rng.standard_normal((M, n)) * a
    z = torch.as_tensor(y / np.linalg.norm(y, axis=1, keepdims=True))
    logw, radius, _, exponent = smc.weights(z, None)
    grad, _ = smc.log_weight_gradients(z, radius)
    gen = torch.Generator().manual_seed(1)
    c = np.array([4.0, 1.0, 1.0, 1.0, 0.25])
    moved = 0.0
    for _ in range(15):
        z_new, logw, radius, exponent, grad, acc, _ = smc.move_langevin(z, logw, radius, exponent, grad, 1.0,
                                                                        (kappa, c), 0.3, gen, rng)
        moved += float((z_new != z).any(1).double().mean()) / 15
        z = z_new
    assert moved > 0.05  # the chain moved
    assert np.abs((z**2).mean(0).numpy() - exact).max() < 0.03


def test_langevin_reference_on_an_ellipsoid_and_its_bad_inputs():
    n = 30
    g = torch.Generator().manual_seed(3)
    axes = torch.exp(torch.randn(n, generator=g, dtype=DT))
    cost = QuadraticCost(torch.diag(axes**-2), torch.zeros(n, dtype=DT))
    truth = n / 2 * math.log(math.pi) - math.lgamma(n / 2 + 1) + float(torch.log(axes).sum())
    kw = dict(cutoff=0.5, prior=LebesguePrior(), seed=5, n_particles=64, n_runs=4, n_moves=4, n_pilots=0,
              progress=False)
    ref = estimate_log_volume_reference(cost, torch.zeros(n, dtype=DT), moves="langevin", **kw)
    assert truth - ref.paper_log_volume > 3  # the paper's estimator on the same start misses
    assert abs(ref.log_volume - truth) < 0.5, (ref.log_volume - truth, ref)
    assert ref.meta["moves"] == "langevin"
    with pytest.raises(ValueError, match="moves must be one of"):
        estimate_log_volume_reference(cost, torch.zeros(n, dtype=DT), moves="hmc", **kw)

    def numpy_cost(theta):  # computed outside torch: no gradient
        t = theta.detach().numpy()
        return torch.as_tensor(((t / axes.numpy()) ** 2).sum(1))

    with pytest.raises(ValueError, match="differentiate"):
        estimate_log_volume_reference(numpy_cost, torch.zeros(n, dtype=DT), moves="langevin", **kw)


def test_langevin_survives_a_cost_that_does_not_grow_at_the_crossing():
    # a plateau at the cutoff value: ∂r/∂d̂ is undefined there (0/0). The move must fall back to
    # no drift from r (still exact), finish, and report what pCN reports, not die on a NaN proposal
    n = 6

    def plateau(theta):
        r2 = (theta**2).sum(1)
        return torch.clamp(r2, max=1.0) + torch.relu(r2 - 4.0)

    kw = dict(cutoff=1.0, prior=LebesguePrior(), seed=0, n_particles=16, n_runs=4, n_moves=1, n_pilots=0,
              progress=False)
    pcn = estimate_log_volume_reference(plateau, torch.zeros(n, dtype=DT), **kw)
    langevin = estimate_log_volume_reference(plateau, torch.zeros(n, dtype=DT), moves="langevin", **kw)
    assert math.isfinite(langevin.log_volume)
    assert not langevin.converged and not pcn.converged
    assert any("could not be bounded" in p for p in langevin.problems)


def test_langevin_refuses_a_preconditioner_autograd_cannot_see_through():
    # apply computed in numpy on a detached copy: the drift would silently be zero along the sphere
    n = 8

    class NumpyDiagonal:
        def __init__(self, n):
            self.n = n
            self.scales = np.exp(np.linspace(-0.5, 0.5, n))

        def apply(self, u):
            return torch.as_tensor(u.detach().cpu().numpy() * self.scales, dtype=u.dtype)

    cost = QuadraticCost(torch.eye(n, dtype=DT), torch.zeros(n, dtype=DT))
    kw = dict(cutoff=0.5, prior=LebesguePrior(), n_particles=16, n_runs=4, n_moves=1, n_pilots=0, progress=False)
    estimate_log_volume_reference(cost, torch.zeros(n, dtype=DT), preconditioner=NumpyDiagonal(n), **kw)  # pCN: fine
    with pytest.raises(ValueError, match="preconditioner whose apply torch.autograd can differentiate"):
        estimate_log_volume_reference(cost, torch.zeros(n, dtype=DT), preconditioner=NumpyDiagonal(n),
                                      moves="langevin", **kw)


def test_langevin_passes_out_of_memory_through():
    # the backward pass needs more memory than the searches: an OOM there is an OOM, not "a cost
    # autograd cannot differentiate"
    n = 8
    quadratic = QuadraticCost(torch.eye(n, dtype=DT), torch.zeros(n, dtype=DT))

    def cost(theta):
        if theta.requires_grad:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return quadratic(theta)

    with pytest.raises(torch.cuda.OutOfMemoryError):
        estimate_log_volume_reference(cost, torch.zeros(n, dtype=DT), cutoff=0.5, prior=LebesguePrior(),
                                      n_particles=16, n_runs=4, n_moves=1, n_pilots=0, moves="langevin",
                                      progress=False)
