"""Radius search: the returned radius is an evaluated one within tolerance
(docs/authors-code.md#radius-search)."""
import math

import numpy as np
import pytest
import torch

import localvol as lv


def _quartic_cost(theta):
    # a non-quadratic, anisotropic cost: Σ w_j x_j² + (Σ x_j²)²
    w = torch.linspace(0.1, 10.0, theta.shape[1], dtype=theta.dtype)
    sq = theta**2
    return (sq * w).sum(1) + sq.sum(1) ** 2


@pytest.mark.parametrize("cutoff", [1e-6, 1e-2, 1.0, 1e3])
def test_returned_radius_was_evaluated_and_is_within_tolerance(cutoff):
    n, b = 30, 64
    anchor = torch.zeros(n, dtype=torch.float64)
    dirs = torch.randn(b, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = lv.find_radius(_quartic_cost, anchor, dirs, cutoff=cutoff, rtol=1e-2)
    # independent re-evaluation at anchor + radius · unit direction
    unit = dirs / dirs.norm(dim=1, keepdim=True)
    again = _quartic_cost(anchor + torch.as_tensor(res.radius)[:, None] * unit).numpy()
    np.testing.assert_allclose(again, res.cost, rtol=1e-9)
    assert np.all(np.abs(again - cutoff) <= 1e-2 * cutoff)
    # a cold start (first guess 1e-3, up to 7 decades off) still needs few evaluations
    assert np.median(res.evaluations) <= 7


def test_float32_anchor_and_directions():
    n = 100
    anchor = torch.randn(n) * 0.1
    dirs = torch.randn(16, n, generator=torch.Generator().manual_seed(1))
    cost = lambda th: ((th - anchor) ** 2).sum(1) * 3.0  # noqa: E731
    res = lv.find_radius(cost, anchor, dirs, cutoff=0.03, rtol=1e-3)
    np.testing.assert_allclose(res.radius, 0.1, rtol=1e-3)


def test_nan_cost_is_rejected_and_named():
    anchor = torch.zeros(4, dtype=torch.float64)
    dirs = torch.eye(4, dtype=torch.float64)

    def nan_beyond_small(theta):
        r = theta.norm(dim=1)
        out = r**2
        out[r > 1e-3] = float("nan")  # NaN long before the cutoff crossing at r = 0.1
        return out

    with pytest.raises(lv.RadiusSearchError, match="direction 0.*NaN|NaN.*direction 0"):
        lv.find_radius(nan_beyond_small, anchor, dirs, cutoff=1e-2, initial_radius=0.5)


def test_nan_past_a_bracketed_crossing_is_fine():
    anchor = torch.zeros(3, dtype=torch.float64)
    dirs = torch.eye(3, dtype=torch.float64)

    def nan_far_out(theta):
        r = theta.norm(dim=1)
        out = r**2
        out[r > 1.0] = float("nan")  # NaN only well past the crossing at r = 0.1
        return out

    res = lv.find_radius(nan_far_out, anchor, dirs, cutoff=1e-2, initial_radius=5.0)
    np.testing.assert_allclose(res.radius, 0.1, rtol=1e-2)
    assert np.all(np.isfinite(res.cost))


def test_inside_bracket_nan_raises():
    anchor = torch.zeros(1, dtype=torch.float64)
    dirs = torch.ones(1, 1, dtype=torch.float64)

    def hole(theta):  # finite above the cutoff at 1.0 but NaN on (0.2, 0.5)
        r = theta.norm(dim=1)
        out = r.clone()
        out[(r > 0.2) & (r < 0.5)] = float("nan")
        return out

    with pytest.raises(lv.RadiusSearchError, match="never accepted"):
        lv.find_radius(hole, anchor, dirs, cutoff=0.3, initial_radius=1.0)


def test_no_boundary_gives_inf():
    anchor = torch.zeros(3, dtype=torch.float64)
    dirs = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    cost = lambda th: th[:, 0] ** 2  # noqa: E731  (flat along the 2nd axis)
    res = lv.find_radius(cost, anchor, dirs, cutoff=1e-2, max_radius=1e4)
    assert res.radius[0] == pytest.approx(0.1, rel=1e-2)
    assert math.isinf(res.radius[1])


def test_discontinuous_cost_does_not_converge_and_names_the_bracket():
    anchor = torch.zeros(2, dtype=torch.float64)
    dirs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    step = lambda th: (th.norm(dim=1) > 0.5).double()  # noqa: E731  jumps from 0 to 1
    with pytest.raises(lv.RadiusSearchError, match=r"direction 0 .*bracket \[0\.(49|5)"):
        lv.find_radius(step, anchor, dirs, cutoff=0.5)


def test_fewer_evaluations_than_doubling_bisection():
    # the paper's code: ~10-13 evaluations per direction at rtol 1e-2
    # (docs/authors-code.md#radius-search)
    n = 200
    g = torch.Generator().manual_seed(2)
    w = torch.rand(n, generator=g, dtype=torch.float64) * 10
    cost = lambda th: torch.log1p((th**2 * w).sum(1)) + 0.1 * (th**2).sum(1) ** 2  # noqa: E731
    anchor = torch.zeros(n, dtype=torch.float64)
    dirs = torch.randn(200, n, generator=g, dtype=torch.float64)
    res = lv.find_radius(cost, anchor, dirs, cutoff=1e-2, rtol=1e-2, initial_radius=1.0)
    assert np.median(res.evaluations) <= 4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(cutoff=0.0), "cutoff must be finite and > 0"),
        (dict(rtol=1.5), "rtol must be in"),
        (dict(max_radius=-1.0), "max_radius must be > 0"),
        (dict(directions=torch.ones(2, 3)), r"directions must have shape \(B, 2\)"),
        (dict(directions=torch.zeros(1, 2)), "direction 0 has norm 0.0"),
        (dict(initial_radius=-1.0), "initial_radius must be finite and > 0"),
    ],
)
def test_bad_arguments(kw, match):
    args = dict(cutoff=0.1, directions=torch.ones(1, 2, dtype=torch.float64))
    args.update(kw)
    dirs = args.pop("directions")
    with pytest.raises(ValueError, match=match):
        lv.find_radius(lambda th: (th**2).sum(1), torch.zeros(2, dtype=torch.float64), dirs, **args)


def test_points_buffer_and_given_norms_change_nothing():
    """find_radius with a caller's points buffer (larger than the batch) and precomputed
    |d_i| gives the same radii, bit for bit, as with its own."""
    torch.manual_seed(0)
    a = torch.diag(torch.linspace(0.5, 3.0, 6, dtype=torch.float64))
    cost = lv.QuadraticCost(a, torch.zeros(6, dtype=torch.float64))
    anchor = torch.zeros(6, dtype=torch.float64)
    d = torch.randn(4, 6, dtype=torch.float64)
    plain = lv.find_radius(cost, anchor, d, cutoff=0.1)
    buffer = torch.full((7, 6), float("nan"), dtype=torch.float64)
    norms = torch.linalg.vector_norm(d, dim=1).numpy()
    reused = lv.find_radius(cost, anchor, d, cutoff=0.1, points_buffer=buffer, direction_norms=norms)
    np.testing.assert_array_equal(reused.radius, plain.radius)
    np.testing.assert_array_equal(reused.evaluations, plain.evaluations)
    with pytest.raises(ValueError, match="points_buffer must be"):
        lv.find_radius(cost, anchor, d, cutoff=0.1, points_buffer=buffer[:3])
    with pytest.raises(ValueError, match=r"direction_norms must have shape \(4,\)"):
        lv.find_radius(cost, anchor, d, cutoff=0.1, direction_norms=norms[:2])


def test_no_directions_give_empty_results():
    cost = lv.QuadraticCost(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    res = lv.find_radius(cost, torch.zeros(3, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64),
                         cutoff=0.1, anchor_cost=0.0)
    assert res.radius.shape == (0,) and res.evaluations.shape == (0,)
