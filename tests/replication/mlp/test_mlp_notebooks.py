"""The digits MLP stage notebooks (split_digits, train_mlp, estimate_figure1, plot_figure1)
executed through papermill with tiny parameters, in order, in a temporary directory, with their
default (dvc.yaml) paths."""

import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest

from replication.mlp import data
from replication.pipeline import run_notebook, stage_paths

REPO = Path(__file__).resolve().parents[3]
NOTEBOOKS = REPO / "notebooks"

TINY = {
    "split_digits": {},
    "train_mlp": {"hidden": 6, "epochs": 2},
    "estimate_figure1": {
        "n_samples_naive": 12, "n_samples_preconditioned": 6, "batch_size": 8,
        "preconditioners": {
            "hessian_paper": {"kind": "hessian_paper", "eps": 0.1},
            "diag_hessian": {"kind": "diag_hessian", "eps": 1e-2},
            "hesscale": {"kind": "hesscale", "eps": 1e-2},
            "adam_mu": {"kind": "adam_mu", "eps": 1e-3},
            "adam_nu": {"kind": "adam_nu", "eps": 1e-3},
            "hessian_e2": {"kind": "hessian", "eps": 1e-2},
        },
    },
    "plot_figure1": {"bins": 5, "dpi": 40},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("notebooks")
    data.write_raw_data(work / "data" / "digits")
    return work


@pytest.mark.slow
def test_mlp_notebooks_run_in_order_with_tiny_parameters(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the notebooks' default paths are relative to the repo root
    shutil.copy(REPO / "dvc.yaml", workdir / "dvc.yaml")  # the repository root marker
    for stage, params in TINY.items():
        run_notebook(NOTEBOOKS / f"{stage}.py", workdir / "executed" / f"{stage}.ipynb",
                     {**stage_paths(stage, REPO / "dvc.yaml"), **params}, stream=False)

    train, held = data.load_split("results/mlp/split.npz")
    assert (len(train), len(held)) == (1024, 773)
    metrics = json.loads(Path("results/mlp/train_metrics.json").read_text())
    assert metrics["n_parameters"] == 64 * 6 + 6 + 6 * 10 + 10
    fig1 = Path("results/mlp/figure1")
    summary = json.loads((fig1 / "estimates.json").read_text())
    assert list(summary["estimates"]) == ["naive", *TINY["estimate_figure1"]["preconditioners"]]
    for name, r in summary["estimates"].items():
        assert np.isfinite(r["log10_volume"]), name
        assert r["log10_volume"] <= r["max_sample_log10"] + 1e-9
        assert r["cost_evaluations"] > 0 and "wall_time_s" not in r  # DVC outs hold no timings
        assert r["preconditioner_is_identity"] == (name == "naive")
    timings = json.loads((fig1 / "estimates.timings.json").read_text())
    assert all(timings[name]["wall_time_s"] > 0 for name in summary["estimates"])
    assert set(timings["curvature_wall_time_s"]) == {"hessian_s", "eigh_s", "hesscale_s"}
    assert not Path("results/progress/estimate_figure1").exists()  # no resume state left behind
    with np.load(fig1 / "samples.npz") as z:
        assert z["naive__samples"].shape == (12,) and z["hesscale__samples"].shape == (6,)
    with np.load(fig1 / "spectra.npz") as z:
        assert z["hessian_eigenvalues"].shape == (metrics["n_parameters"],)
    em = json.loads((fig1 / "estimate_metrics.json").read_text())
    assert em["naive"]["log10_volume"] == pytest.approx(summary["estimates"]["naive"]["log10_volume"])
    assert set(em["hesscale"]) == {"log10_volume", "log10_prior_at_anchor", "log10_neighbourhood",
                                   "max_sample_log10", "cost_evaluations"}
    for suffix in ("png", "pdf"):
        assert Path(f"figures/figure1_mlp.{suffix}").stat().st_size > 1000
    table = Path("figures/figure1_mlp_aggregates.csv").read_text().splitlines()
    assert table[0].startswith("key,label,cutoff,k,log10_volume")
    assert len(table) == 1 + 1 + len(TINY["estimate_figure1"]["preconditioners"])
    assert "σ = 1.3975" in Path("figures/figure1_mlp_aggregates.md").read_text()
    # the executed copies keep the injected parameters
    executed = nbformat.read(workdir / "executed" / "train_mlp.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "hidden = 6" in injected[0].source
    # what a run prints: no widget or kernel warnings (tqdm's text bars; kernels over local
    # sockets, not unencrypted TCP), and the figure once (not also shown by the inline backend)
    for stage in TINY:
        nb = nbformat.read(workdir / "executed" / f"{stage}.ipynb", as_version=4)
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                       if o.get("name") == "stderr")
        for warning in ("IProgress not found", "TqdmWarning", "without encryption"):
            assert warning not in text, (stage, warning)
    plot = nbformat.read(workdir / "executed" / "plot_figure1.ipynb", as_version=4)
    images = [o for c in plot.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1, "Figure 1 displayed exactly once"
