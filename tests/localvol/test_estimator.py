"""The estimator on neighbourhoods with closed-form volumes and masses (paper §3, eq. 10-19)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2, ncx2

import localvol as lv
from localvol.ray_integral import log_unit_ball_volume


def _ellipsoid(n=200, cond=1e4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, math.log10(cond), n, dtype=torch.float64) * 0.3
    a_mat = (q * lam) @ q.T
    a_mat = 0.5 * (a_mat + a_mat.T)
    center = torch.randn(n, generator=g, dtype=torch.float64)
    return a_mat, lam, center


def _ellipsoid_log_volume(lam, cutoff):
    n = lam.numel()
    return log_unit_ball_volume(n) + n / 2 * math.log(2 * cutoff) - 0.5 * float(torch.log(lam).sum())


def test_ellipsoid_exact_with_matrix_preconditioner():
    a_mat, lam, center = _ellipsoid()
    cutoff = 0.05
    truth = _ellipsoid_log_volume(lam, cutoff)
    est = lv.estimate_log_volume(
        lv.QuadraticCost(a_mat, center), center, cutoff=cutoff, n_samples=40, prior=lv.LebesguePrior(),
        preconditioner=lv.MatrixPreconditioner(a_mat, eps=0.0), rtol=1e-8, progress=False,
    )
    np.testing.assert_allclose(est.samples, truth, rtol=1e-6)
    assert est.log_volume == pytest.approx(truth, rel=1e-6)


def test_ellipsoid_naive_is_below_truth_plus_log_k():
    a_mat, lam, center = _ellipsoid()
    cutoff = 0.05
    truth = _ellipsoid_log_volume(lam, cutoff)
    k = 200
    est = lv.estimate_log_volume(
        lv.QuadraticCost(a_mat, center), center, cutoff=cutoff, n_samples=k, prior=lv.LebesguePrior(),
        progress=False,
    )
    assert est.log_volume <= truth + math.log(k)
    # the naive estimator is far too small here (paper §3.1): tens of nats at cond 1e4
    assert est.log_volume < truth - 10
    # and the correctly preconditioned one is not
    assert np.all(np.abs(est.cost_at_radius - cutoff) <= 1e-2 * cutoff)


def test_paper_matrix_preconditioner_is_worse_than_correct_one():
    a_mat, lam, center = _ellipsoid(n=100, cond=1e3)
    cutoff = 0.05
    cost = lv.QuadraticCost(a_mat, center)
    kw = dict(cutoff=cutoff, n_samples=50, prior=lv.LebesguePrior(), rtol=1e-4, progress=False)
    right = lv.estimate_log_volume(cost, center, preconditioner=lv.MatrixPreconditioner(a_mat, eps=0.0), **kw)
    paper = lv.estimate_log_volume(cost, center, preconditioner=lv.PaperMatrixPreconditioner(a_mat, eps=0.0), **kw)
    truth = _ellipsoid_log_volume(lam, cutoff)
    assert right.log_volume == pytest.approx(truth, rel=1e-3)
    # docs/authors-code.md#hessian-mis-application: diag(p) Vᵀ u is no help
    assert paper.log_volume < truth - 5


def test_log_volume_against_log_cutoff_has_slope_n_over_2():
    a_mat, lam, center = _ellipsoid(n=60, cond=100)
    cost = lv.QuadraticCost(a_mat, center)
    cutoffs = [1e-4, 1e-2, 1.0]
    logs = [
        lv.estimate_log_volume(cost, center, cutoff=c, n_samples=30, prior=lv.LebesguePrior(), rtol=1e-6,
                               seed=3, progress=False).log_volume
        for c in cutoffs
    ]
    slopes = np.diff(logs) / np.diff(np.log(cutoffs))
    np.testing.assert_allclose(slopes, 60 / 2, rtol=1e-4)


def test_gaussian_mass_of_ball_matches_noncentral_chi_square():
    # cost |θ − θ0|²: the neighbourhood is the ball of radius R around θ0 (off the origin);
    # its N(0, σ²I) mass is P(χ'²_N(λ = |θ0|²/σ²) ≤ R²/σ²).
    n, sigma = 8, 0.7
    g = torch.Generator().manual_seed(1)
    anchor = torch.randn(n, generator=g, dtype=torch.float64) * 0.5
    cutoff, k = 0.36, 4000  # R = 0.6
    cost = lv.QuadraticCost(2.0 * torch.eye(n, dtype=torch.float64), anchor)
    est = lv.estimate_log_volume(cost, anchor, cutoff=cutoff, n_samples=k, prior=lv.GaussianPrior(sigma),
                                 rtol=1e-9, progress=False)
    lam = float((anchor**2).sum()) / sigma**2
    truth = ncx2.logcdf(cutoff / sigma**2, n, lam)
    w = np.exp(est.samples - est.samples.max())
    rel_se = w.std() / w.mean() / math.sqrt(k)
    assert abs(est.log_volume - truth) < 4 * rel_se + 1e-6
    assert rel_se < 0.05  # the test has power: a wrong offset term shifts the mass by far more
    assert est.log_prior_at_anchor == pytest.approx(-0.5 * lam)
    np.testing.assert_allclose(est.radii, 0.6, rtol=1e-8)


def test_per_parameter_sigma_equals_scalar_sigma():
    n = 5
    anchor = torch.linspace(-1, 1, n, dtype=torch.float64)
    cost = lv.QuadraticCost(torch.eye(n, dtype=torch.float64), anchor)
    kw = dict(cutoff=0.1, n_samples=20, rtol=1e-6, progress=False)
    a = lv.estimate_log_volume(cost, anchor, prior=lv.GaussianPrior(0.8), **kw)
    b = lv.estimate_log_volume(cost, anchor, prior=lv.GaussianPrior(torch.full((n,), 0.8, dtype=torch.float64)), **kw)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-12)


def test_unbounded_directions_give_finite_gaussian_mass_and_infinite_volume():
    # the cost ignores the last coordinate: every direction with a component along it is bounded,
    # but the exact axis is not: use a cost that is flat beyond a plateau instead.
    n = 4
    anchor = torch.zeros(n, dtype=torch.float64)
    flat = lambda th: torch.zeros(th.shape[0], dtype=th.dtype)  # noqa: E731
    est = lv.estimate_log_volume(flat, anchor, cutoff=1.0, n_samples=5, prior=lv.GaussianPrior(1.0), progress=False)
    assert np.all(np.isinf(est.radii))
    assert est.log_volume == pytest.approx(0.0, abs=1e-9)  # the whole Gaussian: probability 1
    with pytest.warns(UserWarning, match="infinite Lebesgue volume"):
        est = lv.estimate_log_volume(flat, anchor, cutoff=1.0, n_samples=3, prior=lv.LebesguePrior(), progress=False)
    assert est.log_volume == math.inf


def test_gaussian_mass_is_at_most_one_and_grows_with_cutoff():
    n = 30
    anchor = torch.zeros(n, dtype=torch.float64)  # at the prior's centre every direction is alike
    cost = lv.QuadraticCost(torch.eye(n, dtype=torch.float64), anchor)
    vals = [lv.estimate_log_volume(cost, anchor, cutoff=c, n_samples=20, prior=lv.GaussianPrior(1.0),
                                   progress=False).log_volume for c in (0.01, 1.0, 100.0, 1e4)]
    assert vals[0] < vals[1] < vals[2] <= 1e-12  # a probability: log ≤ 0
    # the ball of radius √(2c) around the origin: P(χ²_30 ≤ 2c)
    np.testing.assert_allclose(vals, [chi2.logcdf(2 * c, n) for c in (0.01, 1.0, 100.0, 1e4)], rtol=1e-6, atol=1e-9)


def test_batching_does_not_change_directions_or_results():
    a_mat, lam, center = _ellipsoid(n=50, cond=100)
    cost = lv.QuadraticCost(a_mat, center)
    kw = dict(cutoff=0.1, n_samples=12, prior=lv.LebesguePrior(), rtol=1e-9, progress=False, seed=7)
    one = lv.estimate_log_volume(cost, center, batch_size=1, **kw)
    many = lv.estimate_log_volume(cost, center, batch_size=12, **kw)
    np.testing.assert_allclose(one.samples, many.samples, rtol=1e-7)


def test_resume_after_interruption_keeps_finished_samples(tmp_path):
    a_mat, lam, center = _ellipsoid(n=40, cond=100)
    base = lv.QuadraticCost(a_mat, center)
    kw = dict(cutoff=0.1, n_samples=40, prior=lv.LebesguePrior(), rtol=1e-9, progress=False, batch_size=8)
    full = lv.estimate_log_volume(base, center, **kw)

    calls = {"n": 0}

    def flaky(theta):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return base(theta)

    ckpt = tmp_path / "est.npz"
    with pytest.raises(KeyboardInterrupt):
        lv.estimate_log_volume(flaky, center, checkpoint_path=ckpt, **kw)
    saved = np.load(ckpt)
    n_done = int(saved["done"].sum())
    assert 0 < n_done < 40
    counted = {"n": 0}

    def counting(theta):
        counted["n"] += theta.shape[0]
        return base(theta)

    resumed = lv.estimate_log_volume(counting, center, checkpoint_path=ckpt, **kw)
    for name in ("samples", "radii", "evaluations", "direction_norms", "cost_at_radius"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name))
    assert counted["n"] < full.cost_evaluations - n_done  # finished samples were not redone
    assert resumed.cost_evaluations == full.cost_evaluations + 3  # + the 3 probe points
    with pytest.raises(ValueError, match="different settings"):
        lv.estimate_log_volume(base, center, checkpoint_path=ckpt, **{**kw, "cutoff": 0.2})


def _bad_call(**over):
    anchor = torch.zeros(3, dtype=torch.float64)
    cost = lv.QuadraticCost(torch.eye(3, dtype=torch.float64), anchor)
    kw = dict(cutoff=0.1, n_samples=2, prior=lv.GaussianPrior(1.0), progress=False)
    kw.update(over)
    anchor = kw.pop("anchor", anchor)
    cost = kw.pop("cost", cost)
    return lv.estimate_log_volume(cost, anchor, **kw)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(cutoff=0.0), "cutoff must be finite and > 0, got 0.0"),
        (dict(cutoff=-1.0), "cutoff must be finite and > 0, got -1.0"),
        (dict(cutoff=float("nan")), "cutoff must be finite and > 0, got nan"),
        (dict(n_samples=0), "n_samples must be an integer ≥ 1, got 0"),
        (dict(n_samples=2.5), "n_samples must be an integer ≥ 1, got 2.5"),
        (dict(rtol=0.0), "rtol must be in"),
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(anchor=torch.zeros(3, 1)), "anchor must be a 1-D"),
        (dict(anchor=torch.zeros(3, dtype=torch.int64)), "anchor must be a 1-D float32/float64"),
        (dict(prior=lv.GaussianPrior(torch.ones(4))), "sigma has 4 entries but the anchor has 3"),
        (dict(prior="gaussian"), "prior must be GaussianPrior or LebesguePrior"),
        (dict(preconditioner=lv.DiagonalPreconditioner(torch.ones(5), eps=0.1)), "preconditioner is for 5"),
        (dict(cost=lambda th: -((th - 0) ** 2).sum(1)), "cost is negative relative to the anchor"),
        (dict(cost=lambda th: torch.ones(th.shape[0]) * float("nan")), "the cost at the anchor is not finite"),
    ],
)
def test_bad_input_raises_value_error_naming_it(over, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**over)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: lv.GaussianPrior(0.0), "sigma must be a finite standard deviation > 0, got 0.0"),
        (lambda: lv.GaussianPrior(-1.0), "got -1.0"),
        (lambda: lv.GaussianPrior(torch.tensor([1.0, 0.0])), r"sigma\[1\] = 0.0"),
        (lambda: lv.GaussianPrior(float("inf")), "got inf"),
    ],
)
def test_bad_sigma(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_markov_statement_and_units():
    anchor = torch.zeros(3, dtype=torch.float64)
    est = _bad_call(n_samples=10)
    assert est.log10_volume == pytest.approx(est.log_volume / math.log(10))
    assert "1/k = 0.1" in est.markov and "eq. 14" in est.markov
    assert 0 < est.max_sample_share <= 1
    d = est.to_dict()
    assert d["log_volume"] == est.log_volume and d["n_samples"] == 10
    assert est.cost_evaluations == 1 + int(est.evaluations.sum())
    assert anchor.shape == (3,)


def test_checkpoint_refuses_another_cost_sigma_order_or_eigenvectors(tmp_path):
    """Regression: the resume fingerprint once ignored the cost, σ's order and the eigenvectors."""
    n = 6
    center = torch.linspace(-0.5, 0.5, n, dtype=torch.float64)
    a_mat = torch.diag(torch.linspace(1, 3, n, dtype=torch.float64))
    sigma = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    ckpt = tmp_path / "c.npz"
    kw = dict(cutoff=0.5, n_samples=8, progress=False, checkpoint_path=ckpt)
    lv.estimate_log_volume(lv.QuadraticCost(a_mat, center), center, prior=lv.GaussianPrior(sigma), **kw)
    with pytest.raises(ValueError, match="different cost"):
        lv.estimate_log_volume(lv.QuadraticCost(100 * a_mat, center), center, prior=lv.GaussianPrior(sigma), **kw)
    with pytest.raises(ValueError, match="different settings"):
        lv.estimate_log_volume(lv.QuadraticCost(a_mat, center), center, prior=lv.GaussianPrior(sigma.flip(0)), **kw)
    q1 = torch.eye(n, dtype=torch.float64)
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    lam = torch.linspace(1, 3, n, dtype=torch.float64)
    ckpt2 = tmp_path / "d.npz"
    kw2 = dict(kw, checkpoint_path=ckpt2)
    cost = lv.QuadraticCost(a_mat, center)
    lv.estimate_log_volume(cost, center, prior=lv.GaussianPrior(1.0),
                           preconditioner=lv.MatrixPreconditioner.from_eigh(lam, q1, eps=0.0), **kw2)
    with pytest.raises(ValueError, match="different settings"):
        lv.estimate_log_volume(cost, center, prior=lv.GaussianPrior(1.0),
                               preconditioner=lv.MatrixPreconditioner.from_eigh(lam, q2, eps=0.0), **kw2)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "bad.npz"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        _bad_call(checkpoint_path=ckpt)


def test_default_batch_size_rule():
    from localvol.estimator import default_batch_size

    assert default_batch_size(1000, 4810) == 64  # digits MLP
    assert default_batch_size(10, 4810) == 10  # never more than k
    assert default_batch_size(1000, 30_494_720) == 2  # Pythia-31M: 2^26 // N
    assert default_batch_size(1000, 2**27) == 1  # at least one


def test_sample_directions_into_a_buffer_equals_fresh_draws():
    fresh = lv.sample_directions(50, [3, 0, 9], seed=4, dtype=torch.float32, device="cpu")
    buf = torch.full((3, 50), float("nan"))
    got = lv.sample_directions(50, [3, 0, 9], seed=4, dtype=torch.float32, device="cpu", out=buf)
    assert got is buf and torch.equal(got, fresh)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(3, 50\) torch.float32 tensor on cpu, got \(2, 50\)"):
        lv.sample_directions(50, [3, 0, 9], seed=4, dtype=torch.float32, device="cpu", out=buf[:2])


class _ScalePreconditioner:
    """diag(p) with det 1, applied out of place or in place on u (both are allowed)."""

    def __init__(self, n, in_place):
        p = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
        self.p, self.n, self.in_place = p / p.log().mean().exp(), n, in_place

    def apply(self, u):
        return u.mul_(self.p) if self.in_place else u * self.p


def test_a_preconditioner_working_in_place_on_u_gives_the_same_estimate():
    a_mat, lam, center = _ellipsoid(n=12, cond=10)
    cost = lv.QuadraticCost(a_mat, center)
    kw = dict(cutoff=0.1, n_samples=9, prior=lv.GaussianPrior(1.0), batch_size=4, progress=False)
    copy = lv.estimate_log_volume(cost, center, preconditioner=_ScalePreconditioner(12, False), **kw)
    inplace = lv.estimate_log_volume(cost, center, preconditioner=_ScalePreconditioner(12, True), **kw)
    np.testing.assert_array_equal(inplace.samples, copy.samples)
    np.testing.assert_array_equal(inplace.direction_norms, copy.direction_norms)
    assert not np.allclose(copy.direction_norms, 1.0)  # |P u| / |u| really differs from 1


def test_a_preconditioner_returning_the_wrong_shape_is_named():
    class Bad:
        def apply(self, u):
            return u[:, :-1]

    a_mat, lam, center = _ellipsoid(n=6, cond=10)
    with pytest.raises(ValueError, match=r"preconditioner.apply returned a tensor of shape \(3, 5\) "
                                         r"for directions of shape \(3, 6\)"):
        lv.estimate_log_volume(lv.QuadraticCost(a_mat, center), center, cutoff=0.1, n_samples=3,
                               prior=lv.LebesguePrior(), preconditioner=Bad(), progress=False)


def test_sample_directions_refuses_a_non_contiguous_buffer():
    buf = torch.empty(50, 3).t()  # (3, 50), strided
    with pytest.raises(ValueError, match="not contiguous"):
        lv.sample_directions(50, [0, 1, 2], seed=0, dtype=torch.float32, device="cpu", out=buf)


# -- issue 23: resume fingerprints by what a preconditioner and a cost do ---------------------
class _NoReprPreconditioner:
    """A preconditioner as the docs allow (``apply`` and ``n``), with no repr of its own (the
    default repr holds the object's address, different for every instance)."""

    def __init__(self, p):
        self.p, self.n = p, p.numel()

    def apply(self, u):
        return u * self.p.to(u.dtype)


class _SameReprPreconditioner(_NoReprPreconditioner):
    def __repr__(self):
        return "MyPreconditioner()"


def _interrupted(tmp_path, make_precond, kw):
    """Run until the cost's 4th call raises, leaving a checkpoint with some samples done."""
    a_mat, lam, center = _ellipsoid(n=12, cond=10)
    base = lv.QuadraticCost(a_mat, center)
    calls = {"n": 0}

    def flaky(theta):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return base(theta)

    ckpt = tmp_path / "p.npz"
    with pytest.raises(KeyboardInterrupt):
        lv.estimate_log_volume(flaky, center, preconditioner=make_precond(), checkpoint_path=ckpt, **kw)
    assert 0 < int(np.load(ckpt)["done"].sum()) < kw["n_samples"]
    return base, center, ckpt


def test_a_preconditioner_without_a_repr_of_its_own_resumes_bit_for_bit(tmp_path):
    p = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    p = p / p.log().mean().exp()
    kw = dict(cutoff=0.1, n_samples=12, prior=lv.GaussianPrior(1.0), batch_size=4, progress=False)
    base, center, ckpt = _interrupted(tmp_path, lambda: _NoReprPreconditioner(p), kw)
    full = lv.estimate_log_volume(base, center, preconditioner=_NoReprPreconditioner(p), **kw)
    resumed = lv.estimate_log_volume(lambda th: base(th), center, preconditioner=_NoReprPreconditioner(p.clone()),
                                     checkpoint_path=ckpt, **kw)  # another instance: resumed
    np.testing.assert_array_equal(resumed.samples, full.samples)
    assert resumed.cost_evaluations == full.cost_evaluations + 3


def test_two_preconditioners_with_one_repr_but_another_action_are_not_resumed(tmp_path):
    p = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    p = p / p.log().mean().exp()
    q = p.clone()
    q[3] *= 1 + 1e-15  # the last bit of one scale
    assert repr(_SameReprPreconditioner(p)) == repr(_SameReprPreconditioner(q))
    kw = dict(cutoff=0.1, n_samples=12, prior=lv.GaussianPrior(1.0), batch_size=4, progress=False)
    base, center, ckpt = _interrupted(tmp_path, lambda: _SameReprPreconditioner(p), kw)
    with pytest.raises(ValueError, match="different settings"):
        lv.estimate_log_volume(lambda th: base(th), center, preconditioner=_SameReprPreconditioner(q),
                               checkpoint_path=ckpt, **kw)
    lv.estimate_log_volume(lambda th: base(th), center, preconditioner=_SameReprPreconditioner(p.clone()),
                           checkpoint_path=ckpt, **kw)


def test_preconditioner_digest_is_its_action_not_the_global_rng():
    from localvol._progress import preconditioner_digest

    anchor = torch.zeros(12, dtype=torch.float64)
    p = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    torch.manual_seed(1)
    first = preconditioner_digest(_NoReprPreconditioner(p), anchor)
    torch.manual_seed(2)
    torch.randn(100)
    assert preconditioner_digest(_NoReprPreconditioner(p.clone()), anchor) == first
    assert preconditioner_digest(lv.DiagonalPreconditioner(p**-2, eps=0.0), anchor) != first  # p normalised


def test_a_few_changed_evaluation_inputs_are_another_cost(tmp_path):
    """3 of 20,000 inputs moved by 1e-6 change the KL near the anchor far below the old 1e-4
    tolerance of the cost probe: the exact hash of the inputs refuses the old samples."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    x = torch.randn(20_000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    ckpt = tmp_path / "kl.npz"
    kw = dict(cutoff=1e-3, n_samples=3, prior=lv.GaussianPrior(1.0), progress=False, checkpoint_path=ckpt)
    first = lv.estimate_log_volume(lv.ExpectedKL(model, x), anchor, **kw)
    again = lv.estimate_log_volume(lv.ExpectedKL(model, x.clone()), anchor, **kw)  # the same data: resumed
    np.testing.assert_array_equal(again.samples, first.samples)
    y = x.clone()
    y[[5, 600, 19_999]] += 1e-6
    with pytest.raises(ValueError, match="different cost"):
        lv.estimate_log_volume(lv.ExpectedKL(model, y), anchor, **kw)


# -- issue 23: resume files validated on load ---------------------------------------------
def _written(tmp_path):
    a_mat, lam, center = _ellipsoid(n=8, cond=10)
    cost = lv.QuadraticCost(a_mat, center)
    kw = dict(cutoff=0.1, n_samples=6, prior=lv.GaussianPrior(1.0), batch_size=3, progress=False)
    ckpt = tmp_path / "ok.npz"
    lv.estimate_log_volume(cost, center, checkpoint_path=ckpt, **kw)
    with np.load(ckpt) as f:
        data = {k: f[k] for k in f.files}
    return cost, center, kw, ckpt, data


@pytest.mark.parametrize("field, value, what", [
    ("samples", np.nan, r"'samples' is not a valid number \(first: sample 2 = nan\)"),
    ("samples", np.inf, r"'samples' is not a valid number \(first: sample 2 = inf\)"),
    ("radii", np.nan, r"'radii' is not a valid number"),
    ("cost_at_radius", np.nan, r"'cost_at_radius' is not a valid number"),
])
def test_a_resume_file_with_a_non_number_sample_is_refused_naming_it(tmp_path, field, value, what):
    cost, center, kw, ckpt, data = _written(tmp_path)
    data[field][2] = value
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    with pytest.raises(ValueError, match=f"checkpoint {bad} holds 1 finished sample.*{what}.*delete it"):
        lv.estimate_log_volume(cost, center, checkpoint_path=bad, **kw)


def test_a_resume_file_missing_an_array_is_refused_naming_it(tmp_path):
    cost, center, kw, ckpt, data = _written(tmp_path)
    del data["radii"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    with pytest.raises(ValueError, match=f"checkpoint {bad} lacks the array\\(s\\) radii .*delete it"):
        lv.estimate_log_volume(cost, center, checkpoint_path=bad, **kw)


def test_a_resume_file_with_a_flipped_byte_is_refused_naming_it(tmp_path):
    import zipfile

    cost, center, kw, ckpt, data = _written(tmp_path)
    raw = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as z:
        info = z.getinfo("samples.npy")
    # local header (30 bytes + name + extra), then the .npy (a 128-byte header, then the data)
    extra = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    at = info.header_offset + 30 + len(info.filename) + extra + 128 + 5
    raw[at] ^= 0x10
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"checkpoint {bad} cannot be read \\(BadZipFile.*delete it"):
        lv.estimate_log_volume(cost, center, checkpoint_path=bad, **kw)


# -- issue 23: a size check before any allocation -----------------------------------------
def _never_called(theta):
    raise AssertionError("the cost was evaluated before the size check")


def test_n_samples_too_large_for_memory_is_refused_before_anything_is_allocated(monkeypatch):
    import localvol.estimator as est

    anchor = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"n_samples = 100000000000 needs 5\.7e\+03 GB for its per-sample arrays \(57 bytes per sample\)"):
        lv.estimate_log_volume(_never_called, anchor, cutoff=0.1, n_samples=10**11,
                               prior=lv.GaussianPrior(1.0), progress=False)
    monkeypatch.setattr(est, "_physical_memory", lambda: 57 * 1000)
    with pytest.raises(ValueError, match=r"n_samples = 1001 needs .* use fewer samples \(at most 1000\)"):
        lv.VolumeRun(_never_called, anchor, cutoff=0.1, n_samples=1001, prior=lv.GaussianPrior(1.0))
    with pytest.raises(AssertionError, match="evaluated before"):  # 1000 fit: it goes on to the cost
        lv.VolumeRun(_never_called, anchor, cutoff=0.1, n_samples=1000, prior=lv.GaussianPrior(1.0))
