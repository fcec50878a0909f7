"""Issue 9 §4: Adam moments that are all zero, or from another optimizer, must not silently
become the identity preconditioner (the naive estimate under an "Adam ν" label)."""
import numpy as np
import pytest
import torch
from torch import nn

import localvol as lv


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _step(model, opt):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_never_stepped_adam_is_an_error_that_counts_the_zeros():
    model = _model()
    n = sum(p.numel() for p in model.parameters())  # 66
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=f"{n} of {n} entries of 'exp_avg_sq' are zero: the optimizer never stepped"):
        lv.adam_moment(model, opt.state_dict())
    nu = lv.adam_moment(model, opt.state_dict(), allow_never_stepped=True)  # the explicit opt-in
    assert nu.shape == (n,) and not nu.any()


def test_plain_sgd_state_is_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no per-parameter state
    _step(model, opt)
    assert opt.state_dict()["state"] == {}
    with pytest.raises(ValueError, match="not an Adam/AdamW state dict"):
        lv.adam_moment(model, opt.state_dict())


def test_stepped_adam_still_works():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    _step(model, opt)
    nu = lv.adam_moment(model, opt.state_dict())
    assert (nu > 0).all()


@pytest.mark.parametrize("make, identity", [
    (lambda n: None, True),
    (lambda n: lv.DiagonalPreconditioner(torch.zeros(n), eps=1e-3), True),
    (lambda n: lv.DiagonalPreconditioner(torch.full((n,), 4.0), eps=0.0), True),
    (lambda n: lv.DiagonalPreconditioner(torch.linspace(0.1, 2.0, n), eps=1e-3), False),
])
def test_every_result_records_whether_the_preconditioner_was_the_identity(make, identity):
    n = 6
    cost = lv.QuadraticCost(torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))
    est = lv.estimate_log_volume(cost, torch.zeros(n, dtype=torch.float64), cutoff=0.5, n_samples=4,
                                 prior=lv.GaussianPrior(1.0), preconditioner=make(n), progress=False)
    assert est.preconditioner_is_identity is identity
    assert est.to_dict()["preconditioner_is_identity"] is identity


class _Copy:
    """A user's preconditioner (no scales) that is the identity."""

    def __init__(self, n):
        self.n = n

    def apply(self, u):
        return u.clone()


def test_identity_is_detected_within_a_tolerance_and_documented():
    """Issue 23: Adam ν of all zeros but one 1e-30 (eps 1e-6) gives scales within 1e-9 of 1: in
    float32 the estimate is bit for bit the naive one, so it must be labelled the identity."""
    n = 6
    nu = torch.zeros(n)
    nu[2] = 1e-30
    precond = lv.DiagonalPreconditioner(nu, eps=1e-6)
    spread = float(precond.scales.max() / precond.scales.min()) - 1
    assert 1e-10 < spread < 1e-8  # not exactly 1: the old |log p| < 1e-12 test said "not identity"
    anchor = torch.zeros(n, dtype=torch.float32)
    cost = lv.QuadraticCost(torch.eye(n), anchor)
    kw = dict(cutoff=0.5, n_samples=4, prior=lv.GaussianPrior(1.0), progress=False)
    naive = lv.estimate_log_volume(cost, anchor, **kw)
    est = lv.estimate_log_volume(cost, anchor, preconditioner=precond, **kw)
    np.testing.assert_array_equal(est.samples, naive.samples)
    assert est.preconditioner_is_identity is True
    from localvol.estimator import IDENTITY_RTOL, is_identity

    assert IDENTITY_RTOL == 1e-6 and "1e-6" in is_identity.__doc__
    assert is_identity(lv.DiagonalPreconditioner(torch.linspace(1, 1 + 2e-6, n), eps=0.0, exponent=1.0)) is False
    # no scales: by its action on the probe directions
    assert is_identity(_Copy(n), anchor) is True
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rotating = lv.PaperMatrixPreconditioner.from_eigh(torch.ones(n), q, eps=0.0)  # diag(1) Vᵀ: a rotation
    assert is_identity(rotating, anchor.double()) is False
    assert is_identity(lv.PaperMatrixPreconditioner.from_eigh(torch.ones(n), torch.eye(n), eps=0.0),
                       anchor.double()) is True
