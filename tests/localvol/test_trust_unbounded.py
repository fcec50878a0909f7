"""Issue 9 §6: directions along which the cost never reaches the cutoff are counted and warned
about under either prior (before, only the Lebesgue prior warned; under the Gaussian prior a
constant cost, e.g. the KL of a one-column head, passed silently)."""
import warnings

import numpy as np
import pytest
import torch

import localvol as lv


def _flat(theta):
    return torch.zeros(theta.shape[0], dtype=theta.dtype)  # a cost that never rises


def test_unbounded_directions_are_counted_and_warned_about_under_the_gaussian_prior():
    anchor = torch.zeros(7, dtype=torch.float64)
    with pytest.warns(UserWarning, match="5 of 5 directions stay below the cutoff"):
        est = lv.estimate_log_volume(_flat, anchor, cutoff=0.1, n_samples=5,
                                     prior=lv.GaussianPrior(1.0), progress=False)
    assert est.n_unbounded == 5 and est.to_dict()["n_unbounded"] == 5
    # whole rays from the prior's centre: each sample is the full prior mass, log 1 = 0
    np.testing.assert_allclose(est.samples, 0.0, atol=1e-10)


def test_bounded_directions_give_no_warning_and_a_zero_count():
    anchor = torch.zeros(7, dtype=torch.float64)
    cost = lv.QuadraticCost(torch.eye(7, dtype=torch.float64), anchor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = lv.estimate_log_volume(cost, anchor, cutoff=0.1, n_samples=5,
                                     prior=lv.GaussianPrior(1.0), progress=False)
    assert est.n_unbounded == 0


def test_all_unbounded_names_cutoff_sigma_and_eps_with_their_values():
    """Issue 23: when no direction reaches the cutoff, the warning says what to change."""
    anchor = torch.zeros(7, dtype=torch.float64)
    precond = lv.DiagonalPreconditioner(torch.linspace(1, 2, 7), eps=1e-3)
    with pytest.warns(UserWarning, match=r"5 of 5 directions .* every direction is unbounded.* "
                                         r"Change the cutoff \(now 0\.1: lower it.*\), sigma \(now 0\.04: .*\), "
                                         r"or eps \(now 0\.001: raise it"):
        lv.estimate_log_volume(_flat, anchor, cutoff=0.1, n_samples=5, prior=lv.GaussianPrior(0.04),
                               preconditioner=precond, progress=False)
    with pytest.warns(UserWarning, match=r"sigma \(none here: under the Lebesgue prior max_radius = 1e\+08.*"
                                         r"eps \(none here: naive directions"):
        lv.estimate_log_volume(_flat, anchor, cutoff=0.1, n_samples=5, prior=lv.LebesguePrior(), progress=False)


def test_some_unbounded_directions_give_the_count_without_the_advice():
    anchor = torch.zeros(2, dtype=torch.float64)

    def one_sided(theta):  # rises only where the first coordinate is positive
        return torch.relu(theta[:, 0]) ** 2

    u = lv.sample_directions(2, range(8), seed=0, dtype=torch.float64, device="cpu")
    k = int((u[:, 0] <= 0).sum())
    assert 0 < k < 8
    with pytest.warns(UserWarning, match=f"^{k} of 8 directions stay below") as record:
        est = lv.estimate_log_volume(one_sided, anchor, cutoff=0.1, n_samples=8, prior=lv.GaussianPrior(1.0),
                                     progress=False)
    assert est.n_unbounded == k
    assert not any("every direction is unbounded" in str(w.message) for w in record)
