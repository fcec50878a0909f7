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
