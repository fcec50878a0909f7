"""Issue 9 §4: Adam moments that are all zero, or from another optimizer, must not silently
become the identity preconditioner (the naive estimate under an "Adam ν" label)."""
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
