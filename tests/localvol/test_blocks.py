"""Blocks of samples (localvol.VolumeRun): each block is computed the same way whoever computes
it, in whatever order, interrupted or not, so a split over processes changes no bit."""
import numpy as np
import pytest
import torch

import localvol as lv

FIELDS = ("samples", "radii", "cost_at_radius", "direction_norms", "evaluations")


class QuarticBowl:
    """C(θ) = q + q² with q = ½ Σ w (θ − c)²: not quadratic, so the radius the search returns
    (within rtol) depends on its first guess, and a changed guess shows in the samples."""

    def __init__(self, center, weights):
        self.center, self.weights = center, weights

    def __call__(self, theta):
        q = 0.5 * ((theta - self.center) ** 2 * self.weights).sum(-1)
        return q + q * q


def _setup(n=30):
    g = torch.Generator().manual_seed(3)
    center = torch.randn(n, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64) * 10 + 0.1
    kw = dict(cutoff=0.5, n_samples=41, prior=lv.GaussianPrior(2.0), rtol=5e-2, batch_size=3,
              seed=11, block_size=8)
    return QuarticBowl(center, weights), center, kw


def _assert_same(a, b):
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.log_volume == b.log_volume and a.cost_evaluations == b.cost_evaluations


def test_blocks_split_over_runs_in_any_order_give_the_same_estimate(tmp_path):
    cost, center, kw = _setup()
    whole = lv.VolumeRun(cost, center, resumable=True, **kw)
    whole.run(progress=False)
    assert whole.n_blocks == 6
    parts = []
    for blocks in ([5, 3, 1], [4, 0, 2]):  # two "processes", blocks out of order
        run = lv.VolumeRun(cost, center, resumable=True, **kw)
        run.run(blocks, save_to=tmp_path / f"shard-{len(parts)}.npz", progress=False)
        parts.append(run)
    merged = lv.VolumeRun(cost, center, resumable=True, **kw)
    for i in range(2):
        assert merged.load(tmp_path / f"shard-{i}.npz")
    _assert_same(merged.result(), whole.result())


def test_a_block_does_not_depend_on_later_blocks_but_on_the_block_size():
    cost, center, kw = _setup()
    full = lv.estimate_log_volume(cost, center, progress=False, **kw)
    shorter = lv.estimate_log_volume(cost, center, progress=False, **{**kw, "n_samples": 20})
    np.testing.assert_array_equal(shorter.samples[:16], full.samples[:16])  # blocks 0 and 1
    other = lv.estimate_log_volume(cost, center, progress=False, **{**kw, "block_size": 5})
    # the guesses decide the radii within rtol: another block size moves later samples
    np.testing.assert_array_equal(other.samples[:5], full.samples[:5])
    assert not np.array_equal(other.samples[8:], full.samples[8:])
    np.testing.assert_allclose(other.samples, full.samples, atol=30 * kw["rtol"])


def test_with_k_within_one_block_the_schedule_is_one_pass_with_a_pilot():
    cost, center, kw = _setup()
    kw = {**kw, "n_samples": 20, "batch_size": 6, "block_size": 256}
    run = lv.VolumeRun(cost, center, **kw)
    assert [b.tolist() for b in run.schedule[0]] == [
        [0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17], [18, 19]]
    run = lv.VolumeRun(cost, center, **{**kw, "batch_size": 64})
    assert [len(b) for b in run.schedule[0]] == [16, 4]  # pilot of 16, then the rest


def test_unfinished_samples_and_foreign_progress_files_are_errors(tmp_path):
    cost, center, kw = _setup()
    run = lv.VolumeRun(cost, center, resumable=True, **kw)
    run.run([1], save_to=tmp_path / "p.npz", progress=False)
    with pytest.raises(ValueError, match=r"30 samples are not finished \(first: \[3, 4, 5, 6, 7\]\)"):
        run.result()  # block 1 and the pilot (samples 0-2) are done
    other = lv.VolumeRun(cost, center, resumable=True, **{**kw, "block_size": 9})
    with pytest.raises(ValueError, match="different settings"):
        other.load(tmp_path / "p.npz")
    with pytest.raises(ValueError, match="resumable=False"):
        lv.VolumeRun(cost, center, **kw).load(tmp_path / "p.npz")


def test_shards_that_disagree_on_a_sample_are_refused(tmp_path):
    cost, center, kw = _setup()
    run = lv.VolumeRun(cost, center, resumable=True, **kw)
    run.run([0], save_to=tmp_path / "a.npz", progress=False)
    with np.load(tmp_path / "a.npz") as f:
        data = {k: f[k] for k in f.files}
    data["samples"][1] += 1e-9  # what a process with another device model might write
    np.savez(tmp_path / "b.npz", **data)
    merged = lv.VolumeRun(cost, center, resumable=True, **kw)
    assert merged.load(tmp_path / "a.npz") and merged.load(tmp_path / "a.npz")  # same: fine
    with pytest.raises(ValueError, match="differ from the same samples"):
        merged.load(tmp_path / "b.npz")
