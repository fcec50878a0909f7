"""ConvNeXt estimate stages (replication.convnext.estimate) on tiny checkpoints, on CPU: the
settings checks, the units (keys, order, series, float64 switch) of Figures 3, 5, 7, and the
numbers: each record's samples equal a direct localvol.estimate_log_volume call with the
experiment's recipe (KL over the evaluation images, Adam ν preconditioner, σ = RMS of step 0)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import localvol
from replication.convnext import checkpoints, estimate
from replication.convnext.data import load_prepared

SHARED = dict(n_eval=4, data_batch_size=4, direction_batch_size=2, vectorize=False, rtol=1e-2,
              seed=0, exponent=0.5, float64_below=0.1, progress=False)


def _paths(root: Path, n: int) -> dict:
    return dict(estimates_path=str(root / f"fig{n}" / "estimates.json"),
                samples_path=str(root / f"fig{n}" / "samples.npz"),
                metrics_path=str(root / f"fig{n}" / "metrics.json"),
                progress_dir=str(root / f"progress{n}"))


@pytest.mark.parametrize("stage, change, match", [
    ("figure3", {"k": 0}, r"estimate_figure3\.k must be an integer ≥ 1, got 0"),
    ("figure5", {"n_eval": 0}, r"convnext_estimate\.n_eval must be an integer ≥ 1"),
    ("figure5", {"direction_batch_size": 2.5}, r"convnext_estimate\.direction_batch_size"),
    ("figure7", {"cutoffs": [1e-2, 1e-3]}, r"estimate_figure7\.cutoffs .*increasing"),
    ("figure7", {"cutoffs": [0.0, 1.0]}, "positive"),
    ("figure3", {"cutoff": -1.0}, r"estimate_figure3\.cutoff "),
    ("figure5", {"adam_eps": -1.0}, r"estimate_figure5\.adam_eps"),
    ("figure7", {"float64_below": -1.0}, r"convnext_estimate\.float64_below"),
])
def test_stages_reject_bad_settings_before_reading_anything(tmp_path, stage, change, match):
    figure = {"cutoffs": [1e-2, 1.0]} if stage == "figure7" else {"cutoff": 1e-2}
    settings = dict(dataset_path=str(tmp_path / "missing.npz"), checkpoints_dir=str(tmp_path),
                    **_paths(tmp_path, 0), **SHARED, **figure, adam_eps=1e-5, k=1)
    with pytest.raises(ValueError, match=match):
        getattr(estimate, f"{stage}_stage")(**{**settings, **change})


def test_units_keep_the_keys_order_series_and_float64_switch():
    kw = dict(k=3, adam_eps=1e-5, float64_below=1e-5)
    fig5 = estimate.figure5_units(["clean", "poisoned"], [0, 1, 2], cutoff=1e-2, **kw)
    assert [u.key for u in fig5] == [
        "ckpt_clean_naive_step1", "ckpt_clean_adam_step1", "ckpt_clean_naive_step2",
        "ckpt_clean_adam_step2", "ckpt_poisoned_naive_step1", "ckpt_poisoned_adam_step1",
        "ckpt_poisoned_naive_step2", "ckpt_poisoned_adam_step2"]
    assert [u.checkpoint for u in fig5[:3]] == ["clean/step1", "clean/step1", "clean/step2"]
    assert [u.series for u in fig5[:2]] == ["clean, naive", "clean, Adam ν ε=1e-05"]
    assert [(u.preconditioner, u.eps) for u in fig5[:2]] == [("naive", None), ("adam_nu", 1e-5)]
    fig3 = estimate.figure3_units(["clean", "poisoned"], 2, cutoff=1e-2, **kw)
    assert [u.key for u in fig3] == ["hist_clean_naive", "hist_clean_adam", "hist_poisoned_naive",
                                     "hist_poisoned_adam"]
    fig7 = estimate.figure7_units(["clean"], 2, cutoffs=[1e-6, 1e-2], **kw)
    assert [(u.key, u.cutoff, u.float64) for u in fig7] == [
        ("cutoff_clean_naive_0", 1e-6, True), ("cutoff_clean_naive_1", 1e-2, False),
        ("cutoff_clean_adam_0", 1e-6, True), ("cutoff_clean_adam_1", 1e-2, False)]
    assert {u.meta["figure"] for u in fig5} | {u.meta["figure"] for u in fig7} == {5, 7}


def _direct(dataset_path, ckpt, run, step, *, cutoff, k, eps, float64, sigma):
    """The experiment's recipe, written out with localvol alone."""
    data = load_prepared(dataset_path)
    x = torch.as_tensor(data["test_images"][data["eval_idx"][:SHARED["n_eval"]]]).float() / 255
    model, state = checkpoints.load_checkpoint(ckpt, run, step)
    nu = localvol.adam_moment(model, state, order=2).float()
    if float64:
        model, x, nu = model.double(), x.double(), nu.double()
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    cost = localvol.ExpectedKL(model, x, batch_size=SHARED["data_batch_size"], vectorize=False)
    precond = None if eps is None else localvol.DiagonalPreconditioner(nu, eps, SHARED["exponent"])
    return localvol.estimate_log_volume(
        cost, anchor, cutoff=cutoff, n_samples=k, prior=localvol.GaussianPrior(sigma),
        preconditioner=precond, rtol=SHARED["rtol"], batch_size=SHARED["direction_batch_size"],
        seed=SHARED["seed"], progress=False)


def test_figure7_records_equal_the_direct_recipe(tiny_checkpoints, tmp_path):
    dataset, ckpt = tiny_checkpoints
    summary = estimate.figure7_stage(dataset_path=dataset, checkpoints_dir=ckpt,
                                     **_paths(tmp_path, 7), **SHARED, cutoffs=[1e-2, 0.2],
                                     adam_eps=1e-5, k=2)
    c = summary["config"]
    assert not Path(tmp_path / "progress7").exists()
    model0, _ = checkpoints.load_checkpoint(ckpt, "clean", 0)
    theta0 = torch.nn.utils.parameters_to_vector(model0.parameters()).detach().double()
    assert c["sigma"] == pytest.approx(float(theta0.pow(2).mean().sqrt()), rel=1e-12)
    assert c["steps"] == [0, 1, 2] and set(c["runs"]) == {"clean", "poisoned"}
    assert len(c["runs"]["clean"]["history"]) == 3 and c["cutoffs"] == [1e-2, 0.2]
    with np.load(tmp_path / "fig7" / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    assert len(summary["estimates"]) == 8
    for key, r in summary["estimates"].items():
        assert (r["run"], r["step"], r["figure"]) == (key.split("_")[1], 2, 7)
        assert r["dtype"] == ("float64" if r["cutoff"] < 0.1 else "float32")
        # the prior term is −|θ0|²/(2σ²) of each anchor
        assert r["log10_prior_at_anchor"] == pytest.approx(-c["n_params"] * r["anchor_rms"] ** 2 / (
            2 * c["sigma"] ** 2) / math.log(10), rel=1e-9)
        direct = _direct(dataset, ckpt, r["run"], 2, cutoff=r["cutoff"], k=2, eps=r["eps"],
                         float64=r["dtype"] == "float64", sigma=c["sigma"])
        np.testing.assert_array_equal(arrays[f"{key}__samples"], direct.samples)
        np.testing.assert_array_equal(arrays[f"{key}__radii"], direct.radii)
        assert r["log10_volume"] == direct.log10_volume


def test_figure3_and_figure5_write_their_records_and_metrics(tiny_checkpoints, tmp_path):
    dataset, ckpt = tiny_checkpoints
    fig3 = estimate.figure3_stage(dataset_path=dataset, checkpoints_dir=ckpt, **_paths(tmp_path, 3),
                                  **SHARED, cutoff=0.2, adam_eps=1e-5, k=2)
    assert list(fig3["estimates"]) == ["hist_clean_naive", "hist_clean_adam",
                                       "hist_poisoned_naive", "hist_poisoned_adam"]
    assert {r["dtype"] for r in fig3["estimates"].values()} == {"float32"}
    metrics = json.loads((tmp_path / "fig3" / "metrics.json").read_text())
    assert isinstance(metrics["poisoned_smaller_naive"], bool) and "clean_val_accuracy" in metrics
    assert metrics["clean_adam"]["log10_volume"] == fig3["estimates"]["hist_clean_adam"]["log10_volume"]
    fig5 = estimate.figure5_stage(dataset_path=dataset, checkpoints_dir=ckpt, **_paths(tmp_path, 5),
                                  **SHARED, cutoff=0.2, adam_eps=1e-5, k=2)
    assert [r["step"] for r in fig5["estimates"].values()] == [1, 1, 2, 2] * 2
    # the same unit at the same checkpoint gives the same samples in either stage
    assert (fig5["estimates"]["ckpt_poisoned_adam_step2"]["log10_volume"]
            == fig3["estimates"]["hist_poisoned_adam"]["log10_volume"])
    assert set(json.loads((tmp_path / "fig5" / "metrics.json").read_text())) == set(fig5["estimates"])


def test_estimates_refuse_weights_the_manifest_did_not_record(tiny_checkpoints, tmp_path):
    dataset, ckpt = tiny_checkpoints
    manifest = json.loads((Path(ckpt) / checkpoints.MANIFEST).read_text())
    manifest["runs"]["clean"]["history"][2]["parameter_sha256"] = "0" * 64
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for run in ("clean", "poisoned"):
        (bad / run).symlink_to(Path(ckpt) / run)
    (bad / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="clean/step2/ holds other weights"):
        estimate.figure3_stage(dataset_path=dataset, checkpoints_dir=str(bad),
                               **_paths(tmp_path, 3), **SHARED, cutoff=0.2, adam_eps=1e-5, k=1)
