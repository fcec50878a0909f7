"""The reference estimator (localvol.reference) on bodies of known volume, its errors and resume."""
import math

import numpy as np
import pytest
import torch

from localvol import (
    DiagonalPreconditioner,
    GaussianPrior,
    LebesguePrior,
    QuadraticCost,
    estimate_log_volume,
    estimate_log_volume_reference,
)
from localvol.ray_integral import log_unit_ball_volume

FAST = dict(n_particles=32, n_runs=4, n_moves=2, n_pilots=1, progress=False)


def ellipsoid(n, seed=0, sd=1.0):
    """{x : Σ (x_j/a_j)² < 1} as the sublevel set C < 1/2 of a quadratic cost; log-normal a_j."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.exp(sd * torch.randn(n, generator=g, dtype=torch.float64))
    cost = QuadraticCost(torch.diag(axes**-2), torch.zeros(n, dtype=torch.float64))
    truth = log_unit_ball_volume(n) + float(torch.log(axes).sum())
    return cost, torch.zeros(n, dtype=torch.float64), axes, truth


def test_matched_preconditioner_is_exact():
    cost, anchor, axes, truth = ellipsoid(50)
    pre = DiagonalPreconditioner(axes**-2, eps=0.0)  # P ∝ A^(−1/2): every weight is the volume
    ref = estimate_log_volume_reference(cost, anchor, cutoff=0.5, prior=LebesguePrior(), preconditioner=pre,
                                        **{**FAST, "n_pilots": 0})
    assert abs(ref.log_volume - truth) < 1e-3
    assert ref.interval[0] <= truth <= ref.interval[1]
    assert all(r.n_temperatures == 1 for r in ref.runs)  # flat weights: one step reaches β = 1
    assert ref.converged, ref.problems
    # a pilot of 32 particles fits a noisy shape; shrunk by its noise, it costs little here
    piloted = estimate_log_volume_reference(cost, anchor, cutoff=0.5, prior=LebesguePrior(), preconditioner=pre, **FAST)
    assert abs(piloted.log_volume - truth) < 0.05


def test_recovers_what_the_paper_estimator_misses():
    # naive on a log-normal ellipsoid at N = 30: the paper's estimator on the same 128 initial
    # directions is several nats low; the reference is within a nat and its interval covers
    cost, anchor, _, truth = ellipsoid(30, seed=3)
    ref = estimate_log_volume_reference(cost, anchor, cutoff=0.5, prior=LebesguePrior(), seed=5,
                                        n_particles=64, n_runs=4, n_moves=8, progress=False)
    assert truth - ref.paper_log_volume > 3
    assert abs(ref.log_volume - truth) < 1.0, (ref.log_volume - truth, ref)
    assert ref.interval[0] - 0.5 <= truth <= ref.interval[1] + 0.5


def test_gaussian_box_against_product_of_erf():
    from scipy.special import log_ndtr
    n, sigma = 20, 1.0
    half = torch.exp(torch.linspace(-1.5, 0.5, n, dtype=torch.float64))

    def cost(theta):  # the box |x_j| < h_j as C < 1, C = max_j |x_j|/h_j (a gauge)
        return (theta.abs() / half).amax(-1)

    h = half.numpy() / sigma
    truth = float(np.sum(np.log(-np.expm1(np.log(2) + log_ndtr(-h)))))
    anchor = torch.zeros(n, dtype=torch.float64)
    ref = estimate_log_volume_reference(cost, anchor, cutoff=1.0, prior=GaussianPrior(sigma), seed=2,
                                        n_particles=64, n_runs=4, n_moves=6, progress=False)
    assert abs(ref.log_volume - truth) < 1.0, (ref.log_volume, truth)
    assert ref.runs[0].local_exponent_min == pytest.approx(1.0, abs=1e-3)  # a gauge grows linearly


def test_one_temperature_case_is_the_paper_estimator():
    cost, anchor, _, _ = ellipsoid(20, seed=1)
    ref = estimate_log_volume_reference(cost, anchor, cutoff=0.5, prior=LebesguePrior(), seed=7,
                                        n_particles=32, n_runs=4, n_moves=1, n_pilots=0, progress=False)
    paper = estimate_log_volume(cost, anchor, cutoff=0.5, n_samples=32, prior=LebesguePrior(), seed=7,
                                rtol=ref.rtol, progress=False)
    # run 0 starts from the estimator's directions 0..31: the same terms within the search's rtol
    assert ref.runs[0].paper_log_volume == pytest.approx(paper.log_volume, abs=20 * ref.rtol * 20)


def test_resume_is_bit_identical(tmp_path):
    cost, anchor, _, _ = ellipsoid(20, seed=2)
    args = dict(cutoff=0.5, prior=LebesguePrior(), seed=3, **FAST)
    whole = estimate_log_volume_reference(cost, anchor, **args)

    calls = {"n": 0}

    def failing(theta):
        calls["n"] += 1
        if calls["n"] > 150:
            raise RuntimeError("interrupted")
        return cost(theta)

    path = tmp_path / "ref.npz"
    with pytest.raises(RuntimeError, match="interrupted"):
        estimate_log_volume_reference(failing, anchor, checkpoint_path=path, **args)
    assert path.exists()
    resumed = estimate_log_volume_reference(cost, anchor, checkpoint_path=path, **args)
    assert resumed.log_volume == whole.log_volume
    assert np.array_equal(resumed.run_log_volumes, whole.run_log_volumes)
    with pytest.raises(ValueError, match="other settings"):
        estimate_log_volume_reference(cost, anchor, checkpoint_path=path, **{**args, "n_moves": 3})


def test_bad_inputs():
    cost, anchor, _, _ = ellipsoid(10)
    args = dict(cutoff=0.5, prior=LebesguePrior(), progress=False)
    with pytest.raises(ValueError, match="n_runs"):
        estimate_log_volume_reference(cost, anchor, n_runs=2, **args)
    with pytest.raises(ValueError, match="n_particles"):
        estimate_log_volume_reference(cost, anchor, n_particles=4, **args)
    with pytest.raises(ValueError, match="ess_fraction"):
        estimate_log_volume_reference(cost, anchor, ess_fraction=1.0, **args)

    noise = torch.Generator().manual_seed(0)

    def noisy(theta):
        return cost(theta) * (1 + 1e-3 * torch.rand(len(theta), generator=noise, dtype=torch.float64))

    with pytest.raises(ValueError, match="not deterministic"):
        estimate_log_volume_reference(noisy, anchor, **args)

    def slab(theta):  # bounded in x_0 only: infinite Lebesgue volume
        return theta[:, 0] ** 2

    with pytest.raises(ValueError, match="unbounded"):
        estimate_log_volume_reference(slab, anchor, max_radius=1e3, **args)

    far, far_anchor, _, _ = ellipsoid(60, sd=2.0)
    with pytest.raises(ValueError, match="max_temperatures"):
        estimate_log_volume_reference(far, far_anchor, cutoff=0.5, prior=LebesguePrior(), n_particles=32,
                                      max_temperatures=2, n_pilots=0, progress=False)
