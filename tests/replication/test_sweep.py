"""The one sweep driver (replication.sweep): every estimate of every stage goes through it.
Checked on the ellipsoid, whose Lebesgue volume has a closed form, and on bookkeeping: each
checkpoint loaded once, units in order, keys unique, float64 units, records and files."""
import json
import math

import numpy as np
import pytest
import torch

import localvol as lv
from localvol.ray_integral import log_unit_ball_volume
from replication.pipeline import timings_path
from replication.sweep import Point, Unit, run_sweep, summary_metrics, summary_table, write_sweep


def _ellipsoid(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, 3, n, dtype=torch.float64)
    a_mat = 0.5 * ((q * lam) @ q.T + ((q * lam) @ q.T).T)
    return a_mat, lam, torch.randn(n, generator=g, dtype=torch.float64)


def _points(loads):
    a_mat, lam, center = _ellipsoid()

    def load(checkpoint):
        loads.append(checkpoint)
        scale = {"a": 1.0, "b": 4.0}[checkpoint]  # checkpoint b: a steeper basin
        cost = lv.QuadraticCost(scale * a_mat, center)
        return Point(anchor=center, cost=cost, info={"scale": scale},
                     preconditioner=lambda name, eps, exponent, dtype: lv.MatrixPreconditioner(
                         scale * a_mat, eps=eps, exponent=exponent))
    return load, lam


def _truth(lam, scale, cutoff):
    n = lam.numel()
    return (log_unit_ball_volume(n) + n / 2 * math.log(2 * cutoff)
            - 0.5 * float(torch.log(scale * lam).sum()))


def test_sweep_matches_the_closed_form_and_loads_each_checkpoint_once(tmp_path):
    loads = []
    load, lam = _points(loads)
    units = [Unit("a_exact", "a", "exact", "hessian", 0.05, 6, eps=0.0, meta={"figure": 9}),
             Unit("b_exact", "b", "exact", "hessian", 0.05, 6, eps=0.0),
             Unit("a_exact_big", "a", "exact", "hessian", 0.5, 6, eps=0.0),
             Unit("a_naive", "a", "naive", "naive", 0.05, 6)]
    sweep = run_sweep(units, load, prior=lv.LebesguePrior(), rtol=1e-9, seed=3, batch_size=4,
                      exponent=0.5, progress_dir=tmp_path / "progress", progress=False)
    assert loads == ["a", "b"]  # in order of first use, once each
    assert list(sweep.records) == ["a_exact", "a_exact_big", "a_naive", "b_exact"]
    for key, scale, cutoff in (("a_exact", 1.0, 0.05), ("b_exact", 4.0, 0.05), ("a_exact_big", 1.0, 0.5)):
        truth = _truth(lam, scale, cutoff)
        np.testing.assert_allclose(sweep.arrays[f"{key}__samples"], truth, rtol=1e-7)
        assert sweep.records[key]["log10_volume"] == pytest.approx(truth / math.log(10), rel=1e-7)
    naive = sweep.records["a_naive"]
    assert naive["log_volume"] < _truth(lam, 1.0, 0.05)  # the naive estimate underestimates here
    assert naive["preconditioner_is_identity"] and not sweep.records["a_exact"]["preconditioner_is_identity"]
    r = sweep.records["a_exact"]
    assert (r["series"], r["checkpoint"], r["figure"], r["scale"], r["n_samples"]) == ("exact", "a", 9, 1.0, 6)
    assert "wall_time_s" not in r and sweep.timings["a_exact"]["wall_time_s"] > 0


def test_sweep_refuses_duplicate_keys(tmp_path):
    load, _ = _points([])
    units = [Unit("x", "a", "naive", "naive", 0.1, 2), Unit("x", "b", "naive", "naive", 0.1, 2)]
    with pytest.raises(ValueError, match="duplicate unit keys: \\['x'\\]"):
        run_sweep(units, load, prior=lv.LebesguePrior(), rtol=1e-2, seed=0, batch_size=2,
                  exponent=0.5, progress_dir=tmp_path, progress=False)


def test_float64_units_use_the_points_float64_copy(tmp_path):
    a_mat, _, center = _ellipsoid()
    calls = []

    def float64():
        calls.append(1)
        return lv.QuadraticCost(a_mat, center), center

    point = Point(anchor=center.float(), cost=lv.QuadraticCost(a_mat.float(), center.float()),
                  float64=float64)
    units = [Unit(f"u{i}", "a", "naive", "naive", 0.05, 3, float64=i > 0) for i in range(3)]
    sweep = run_sweep(units, lambda _: point, prior=lv.LebesguePrior(), rtol=1e-3, seed=0,
                      batch_size=3, exponent=0.5, progress_dir=tmp_path, progress=False)
    assert [sweep.records[f"u{i}"]["dtype"] for i in range(3)] == ["float32", "float64", "float64"]
    assert len(calls) == 1  # built once, on first use


def test_write_sweep_writes_the_files_and_leaves_no_progress(tmp_path):
    load, _ = _points([])
    progress = tmp_path / "progress"
    units = [Unit("a", "a", "naive", "naive", 0.05, 5)]
    sweep = run_sweep(units, load, prior=lv.GaussianPrior(2.0), rtol=1e-3, seed=0, batch_size=2,
                      exponent=0.5, progress_dir=progress, progress=False)
    assert list(progress.glob("*/shard-0.npz"))  # resume state while running
    summary = write_sweep(sweep, config={"k": 5}, estimates_path=tmp_path / "e.json",
                          samples_path=tmp_path / "s.npz", metrics_path=tmp_path / "m.json",
                          progress_dir=progress, extra={"note": "x"})
    assert not progress.exists()
    assert json.loads((tmp_path / "e.json").read_text())["note"] == "x" and summary["config"] == {"k": 5}
    with np.load(tmp_path / "s.npz") as z:
        assert set(z.files) == {f"a__{n}" for n in ("samples", "radii", "cost_at_radius",
                                                     "direction_norms", "evaluations")}
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics == summary_metrics(sweep.records)
    rec = sweep.records["a"]
    assert rec["log10_volume"] == pytest.approx(rec["log10_prior_at_anchor"] + rec["log10_neighbourhood"])
    assert "wall_time_s" in json.loads(timings_path(tmp_path / "e.json").read_text())
    table = summary_table(sweep.records, columns=("series",))
    assert list(table["key"]) == ["a"] and table["series"][0] == "naive"


def test_a_merge_with_samples_missing_from_the_shards_is_an_error(tmp_path):
    """After replication.scale's ranks finish, the stage's own process only merges: a unit
    whose samples are not all in the shards raises instead of being recomputed here."""
    from replication.sweep import MERGE_ONLY

    load, _ = _points([])
    units = [Unit("a", "a", "naive", "naive", 0.05, 5)]
    kw = dict(prior=lv.GaussianPrior(2.0), rtol=1e-3, seed=0, batch_size=2, exponent=0.5,
              progress_dir=tmp_path, progress=False)
    token = MERGE_ONLY.set(True)
    try:
        with pytest.raises(RuntimeError, match=r"a: 5 of 5 samples are not in the shards"):
            run_sweep(units, load, **kw)
    finally:
        MERGE_ONLY.reset(token)
    first = run_sweep(units, load, **kw)  # computes and leaves its shards
    token = MERGE_ONLY.set(True)
    try:
        merged = run_sweep(units, load, **kw)
    finally:
        MERGE_ONLY.reset(token)
    assert merged.records == first.records
