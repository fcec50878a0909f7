"""Honest preconditioner selection (localvol.selection): chosen on a pilot, estimated afresh."""
import math

import numpy as np
import pytest
import torch

import localvol as lv
from localvol.ray_integral import log_unit_ball_volume
from localvol.selection import check_seeds, choose


def _ellipsoid(n=30, cond=1e3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    a_mat = (q * lam) @ q.T
    return 0.5 * (a_mat + a_mat.T), lam, torch.randn(n, generator=g, dtype=torch.float64)


def _grid(a_mat, eps_grid, exponents):
    """Candidates named e{eps}_x{exponent}: the true A at every (ε, exponent), plus naive."""
    grid = {f"e{eps:g}_x{x:g}": lv.MatrixPreconditioner(a_mat, eps=eps, exponent=x)
            for eps in eps_grid for x in exponents}
    return {"naive": None, **grid}


def test_ellipsoid_selection_picks_the_true_matrix_and_the_estimate_is_the_closed_form():
    a_mat, lam, center = _ellipsoid()
    cutoff = 0.05
    truth = log_unit_ball_volume(30) + 15 * math.log(2 * cutoff) - 0.5 * float(torch.log(lam).sum())
    candidates = _grid(a_mat, eps_grid=(1.0, 0.1, 0.0), exponents=(0.25, 1.0, 0.5))
    sel = lv.select_and_estimate(lv.QuadraticCost(a_mat, center), center, candidates,
                                 cutoff=cutoff, n_pilot=16, n_samples=40, prior=lv.LebesguePrior(),
                                 seed=1, pilot_seed=2, rtol=1e-8)
    assert sel.chosen == "e0_x0.5"  # P ∝ A^(-1/2): every direction gives the exact volume
    assert sel.estimate.log_volume == pytest.approx(truth, rel=1e-6)
    np.testing.assert_allclose(sel.estimate.samples, truth, rtol=1e-6)
    # every other candidate's pilot aggregate is below the truth (Jensen: log of a mean of
    # importance weights with spread); the naive one by far
    others = [est.log_volume for name, est in sel.pilot.items() if name != sel.chosen]
    assert max(others) < truth - 1e-3 and sel.pilot["naive"].log_volume < truth - 5
    # the pilot and the estimate used different directions: same k, another seed
    rows = sel.table()
    assert [r["name"] for r in rows] == list(candidates) and sum(r["chosen"] for r in rows) == 1
    assert rows.rows == list(rows) and str(rows).splitlines()[0].split() == [
        "name", "pilot_log10_volume", "pilot_max_sample_log10", "chosen"]
    assert sel.pilot[sel.chosen].n_samples == 16 and sel.estimate.n_samples == 40


def test_the_final_estimate_does_not_reuse_the_pilot_directions():
    """With a preconditioner that is not exact, the reported estimate is the one of the fresh
    seed, equal to a plain estimate with that seed, not the pilot's."""
    a_mat, _, center = _ellipsoid(n=12, cond=30)
    cost, kw = lv.QuadraticCost(a_mat, center), dict(cutoff=0.1, prior=lv.GaussianPrior(1.0), rtol=1e-6)
    candidates = {"naive": None, "diag": lv.DiagonalPreconditioner(torch.diagonal(a_mat), eps=0.0)}
    sel = lv.select_and_estimate(cost, center, candidates, n_pilot=32, n_samples=32, seed=5,
                                 pilot_seed=6, **kw)
    plain = lv.estimate_log_volume(cost, center, n_samples=32, seed=5, progress=False,
                                   preconditioner=candidates[sel.chosen], **kw)
    np.testing.assert_array_equal(sel.estimate.samples, plain.samples)
    assert not np.array_equal(sel.estimate.samples, sel.pilot[sel.chosen].samples)


def test_choose_takes_the_largest_first_on_ties_and_rejects_nan():
    assert choose({"a": -3.0, "b": -1.0, "c": -1.0}) == "b"
    assert choose({"a": -math.inf, "b": -5.0}) == "b"
    with pytest.raises(ValueError, match="'b' is NaN"):
        choose({"a": 1.0, "b": float("nan")})
    with pytest.raises(ValueError, match="no candidates"):
        choose({})


def test_equal_seeds_are_refused_naming_the_keys():
    with pytest.raises(ValueError, match=r"pilot_seed \(3\) must differ from seed \(3\)"):
        check_seeds(3, 3)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^32\), got 1.9"):
        check_seeds(1.9, 1)
    with pytest.raises(ValueError, match="select.pilot_seed"):
        check_seeds(4, 4, keys=("estimate.seed", "select.pilot_seed"))
    a_mat, _, center = _ellipsoid(n=4, cond=2)
    with pytest.raises(ValueError, match="must differ"):
        lv.select_and_estimate(lv.QuadraticCost(a_mat, center), center, {"naive": None},
                               cutoff=0.1, n_pilot=2, n_samples=2, prior=lv.LebesguePrior(),
                               seed=0, pilot_seed=0)


def test_bad_counts_and_candidates_name_the_argument():
    a_mat, _, center = _ellipsoid(n=4, cond=2)
    kw = dict(cutoff=0.1, prior=lv.LebesguePrior(), seed=0, pilot_seed=1)
    cost = lv.QuadraticCost(a_mat, center)
    with pytest.raises(ValueError, match="n_pilot must be an integer ≥ 1, got 0"):
        lv.select_and_estimate(cost, center, {"naive": None}, n_pilot=0, n_samples=2, **kw)
    with pytest.raises(ValueError, match="n_samples must be an integer ≥ 1, got 0"):
        lv.select_and_estimate(cost, center, {"naive": None}, n_pilot=2, n_samples=0, **kw)
    with pytest.raises(ValueError, match="candidates must be a non-empty mapping"):
        lv.select_and_estimate(cost, center, [None], n_pilot=2, n_samples=2, **kw)
    sel = lv.select_and_estimate(cost, center, {"naive": None}, n_pilot=3, n_samples=5, **kw)
    assert (sel.n_pilot, sel.n_samples, sel.seed, sel.pilot_seed) == (3, 5, 0, 1)


def test_table_prints_aligned_and_is_still_the_list_of_rows():
    """Issue 23: table() was a bare list of dicts; it prints as a table now."""
    from localvol.selection import Table

    rows = [{"name": "naive", "pilot_log10_volume": -131.987, "pilot_max_sample_log10": -120.5, "chosen": False},
            {"name": "e0.1_x0.5", "pilot_log10_volume": -90.03, "pilot_max_sample_log10": -88.0, "chosen": True}]
    table = Table(rows)
    assert table == rows and table.rows == rows and list(table) == rows and table[1]["chosen"] is True
    assert str(table) == (
        "name       pilot_log10_volume  pilot_max_sample_log10  chosen\n"
        "naive                 -131.99                 -120.50\n"
        "e0.1_x0.5              -90.03                  -88.00  yes"
    )
    assert repr(table) == str(table) and str(Table()) == "(no rows)"
