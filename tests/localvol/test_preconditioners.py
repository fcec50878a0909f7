"""Unit-determinant preconditioners (paper eq. 16-18) and the fix of
docs/authors-code.md#hessian-mis-application."""
import math

import numpy as np
import pytest
import torch

import localvol as lv


def test_scales_follow_eq_18_and_have_unit_determinant():
    s = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    p = lv.unit_determinant_scales(s, eps=0.1, exponent=0.5)
    raw = 1 / (s.abs() ** 0.5 + 0.1)
    np.testing.assert_allclose(p.numpy(), (raw / raw.prod() ** 0.25).numpy(), rtol=1e-12)
    assert float(torch.log(p).sum()) == pytest.approx(0.0, abs=1e-12)
    # negative curvature enters through |s|
    np.testing.assert_allclose(lv.unit_determinant_scales(-s, 0.1).numpy(), p.numpy(), rtol=1e-12)


def test_exponent_zero_is_naive():
    p = lv.unit_determinant_scales(torch.rand(10) + 0.1, eps=0.3, exponent=0.0)
    np.testing.assert_allclose(p.numpy(), 1.0, rtol=1e-12)


def test_matrix_preconditioner_is_v_diag_p_vt():
    g = torch.Generator().manual_seed(0)
    n = 6
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = m @ m.T
    pre = lv.MatrixPreconditioner(h, eps=0.01)
    lam, vecs = torch.linalg.eigh(h)
    p = lv.unit_determinant_scales(lam, 0.01)
    full = vecs @ torch.diag(p) @ vecs.T
    u = torch.randn(3, n, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(pre.apply(u).numpy(), (u @ full.T).numpy(), rtol=1e-10)
    assert float(torch.linalg.det(full)) == pytest.approx(1.0, rel=1e-10)
    # the paper's version rotates but never rotates back: a different map, same determinant
    paper = lv.PaperMatrixPreconditioner(h, eps=0.01).apply(u)
    assert not torch.allclose(paper, pre.apply(u))
    np.testing.assert_allclose(paper.numpy(), ((u @ vecs) * p).numpy(), rtol=1e-10)
    again = lv.MatrixPreconditioner.from_eigh(lam, vecs, eps=0.01)
    np.testing.assert_allclose(again.apply(u).numpy(), pre.apply(u).numpy(), rtol=1e-12)


def test_diagonal_preconditioner_keeps_dtype():
    pre = lv.DiagonalPreconditioner(torch.tensor([1.0, 4.0]), eps=0.0)
    v = pre.apply(torch.ones(2, 2))
    assert v.dtype == torch.float32
    np.testing.assert_allclose(v[0].numpy(), [math.sqrt(2), 1 / math.sqrt(2)], rtol=1e-6)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: lv.DiagonalPreconditioner(torch.tensor([1.0, float("nan")]), eps=0.1), r"values\[1\] = nan"),
        (lambda: lv.DiagonalPreconditioner(torch.tensor([1.0, float("inf")]), eps=0.1), r"values\[1\] = inf"),
        (lambda: lv.DiagonalPreconditioner(torch.tensor([1.0, 0.0]), eps=0.0), "index 1"),
        (lambda: lv.DiagonalPreconditioner(torch.ones(3), eps=-0.1), "eps must be finite and ≥ 0, got -0.1"),
        (lambda: lv.DiagonalPreconditioner(torch.ones(3), eps=0.1, exponent=-1.0), "exponent must be"),
        (lambda: lv.DiagonalPreconditioner(torch.ones(2, 2), eps=0.1), "1-D"),
        (lambda: lv.MatrixPreconditioner(torch.ones(2, 3), eps=0.1), "square"),
        (lambda: lv.MatrixPreconditioner(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), eps=0.1), "symmetric"),
        (lambda: lv.MatrixPreconditioner(torch.eye(2) * float("nan"), eps=0.1), "non-finite"),
        (lambda: lv.DiagonalPreconditioner(torch.ones(3), eps=0.1).apply(torch.ones(2, 4)), r"\(B, 3\)"),
    ],
)
def test_bad_preconditioners_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_from_eigh_refuses_non_orthonormal_eigenvectors():
    """Regression: a scaled V silently broke the unit determinant (log det P = −8.3 nats)."""
    with pytest.raises(ValueError, match="orthonormal"):
        lv.MatrixPreconditioner.from_eigh(torch.ones(6), 2 * torch.eye(6, dtype=torch.float64), eps=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        lv.MatrixPreconditioner.from_eigh(torch.ones(2), torch.full((2, 2), float("nan")), eps=0.0)
