"""The six ConvNeXt stage notebooks: their parameters cells declare exactly what dvc.yaml passes,
with params.yaml's defaults and dvc.yaml's paths; and (slow) they run through papermill, in
pipeline order, on a tiny network and a tiny JPEG copy."""

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from replication.pipeline import (
    declared_parameters,
    read_notebook,
    run_notebook,
    stage_parameters,
    stage_paths,
)

REPO = Path(__file__).resolve().parents[3]
STAGES = ("prepare_cifar", "train_convnext", "estimate_figure5", "estimate_figure3",
          "estimate_figure7", "plot_convnext")


def notebook_defaults(stage: str) -> dict:
    """{name: literal default} of the notebook's parameters cell."""
    nb = read_notebook(REPO / "notebooks" / f"{stage}.py")
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {node.target.id: ast.literal_eval(node.value)
            for node in ast.parse(cell.source).body if isinstance(node, ast.AnnAssign)}


@pytest.mark.parametrize("stage", STAGES)
def test_notebook_defaults_are_params_yaml_and_dvc_yaml(stage):
    expected = {**stage_parameters(stage, REPO / "dvc.yaml", REPO / "params.yaml"), **stage_paths(stage, REPO / "dvc.yaml")}
    defaults = notebook_defaults(stage)
    assert list(defaults) == declared_parameters(REPO / "notebooks" / f"{stage}.py")
    assert set(defaults) == set(expected)
    for name, value in expected.items():
        if str(defaults[name]).startswith(f"results/scratch/{stage}/"):
            continue  # an output: a hand run writes to scratch (tests/pipeline/test_stage_notebooks.py)
        assert defaults[name] == value, name


def test_notebooks_have_the_stage_layout():
    for stage in STAGES:
        nb = read_notebook(REPO / "notebooks" / f"{stage}.py")
        assert nb.metadata["kernelspec"]["name"] == "python3"
        kinds = [c.cell_type for c in nb.cells]
        assert kinds[:4] == ["markdown", "code", "code", "code"] and len(kinds) <= 5, stage
        assert nb.cells[0].source.startswith("# ") and f"`{stage}`" in nb.cells[0].source
        assert nb.cells[1].metadata["tags"] == ["parameters"]
        assert "P = notebook_setup(globals())" in nb.cells[2].source
        call = (f"run_stage(estimate.{stage[len('estimate_'):]}_stage, P)" if stage.startswith("estimate")
                else "(**P)")
        assert call in nb.cells[3].source, stage  # estimates through replication.scale
        comments = [line.split("#", 1)[1] for line in nb.cells[1].source.splitlines() if "#" in line]
        assert not any("=" in c for c in comments), stage


@pytest.mark.slow
def test_stage_notebooks_run_on_a_tiny_network(tmp_path, monkeypatch, tiny_net):
    from test_convnext_data import write_jpeg_tree

    from replication.convnext.checkpoints import load_checkpoint

    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "jpeg"
    copy.mkdir()
    write_jpeg_tree(copy, "train", per_class=4, seed=1, archive=True)
    write_jpeg_tree(copy, "test", per_class=2, seed=2)
    estimate = {"n_eval": 6, "data_batch_size": 6, "float64_below": 0.1}
    stages = {
        "prepare_cifar": {"local_copy": str(copy), "n_clean": 24, "n_eval": 12},
        "train_convnext": {"max_steps": 2, "batch_size": 4, "warmup": 1, "n_curve": 6,
                           "model_overrides": tiny_net},
        "estimate_figure5": {**estimate, "k": 2},
        "estimate_figure3": {**estimate, "k": 3},
        "estimate_figure7": {**estimate, "cutoffs": [1e-2, 1.0], "k": 2},
        "plot_convnext": {"bins": 4, "dpi": 40},
    }
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")  # the repository root marker
    for stage, params in stages.items():
        run_notebook(REPO / "notebooks" / f"{stage}.py", tmp_path / "executed" / f"{stage}.ipynb",
                     {**stage_paths(stage, REPO / "dvc.yaml"), **params}, stream=False)
    summaries = {n: json.loads(Path(f"results/convnext/figure{n}/estimates.json").read_text())
                 for n in (3, 5, 7)}
    keys = set().union(*(s["estimates"] for s in summaries.values()))
    for run in ("clean", "poisoned"):
        for tag in ("naive", "adam"):
            assert {f"ckpt_{run}_{tag}_step1", f"ckpt_{run}_{tag}_step2", f"hist_{run}_{tag}",
                    f"cutoff_{run}_{tag}_0", f"cutoff_{run}_{tag}_1"} <= keys
    # the training curves for `dvc plots`: one row per checkpoint, <run>_<metric> columns
    curves = np.genfromtxt("results/convnext/train_history.csv", delimiter=",", names=True)
    manifest = json.loads(Path("results/convnext/checkpoints/manifest.json").read_text())
    assert list(curves["step"]) == manifest["steps"] == [0, 1, 2]
    for run in ("clean", "poisoned"):
        np.testing.assert_allclose(curves[f"{run}_val_accuracy"],
                                   [h["val_accuracy"] for h in manifest["runs"][run]["history"]])
    model0, _ = load_checkpoint("results/convnext/checkpoints", "clean", 0)
    theta0 = np.concatenate([p.detach().double().numpy().ravel() for p in model0.parameters()])
    for summary in summaries.values():
        c = summary["config"]
        assert c["source"].startswith("JPEG copy") and set(c["runs"]) == {"clean", "poisoned"}
        assert c["sigma"] == pytest.approx(float(np.sqrt(np.mean(theta0 ** 2))), rel=1e-12)
        for r in summary["estimates"].values():
            assert np.isfinite(r["log10_volume"]) and r["log10_volume"] <= r["max_sample_log10"] + 1e-9
    # cutoffs below float64_below are evaluated by a float64 copy of the network
    fig7 = summaries[7]["estimates"]
    assert fig7["cutoff_clean_adam_0"]["dtype"] == "float64"  # cutoff 1e-2
    assert fig7["cutoff_clean_adam_1"]["dtype"] == "float32"  # cutoff 1.0
    assert summaries[3]["estimates"]["hist_poisoned_naive"]["dtype"] == "float64"  # 1e-2 too
    metrics = json.loads(Path("results/convnext/figure3/estimate_metrics.json").read_text())
    assert isinstance(metrics["poisoned_smaller_naive"], bool)
    assert not Path("results/progress").exists() or not any(Path("results/progress").iterdir())
    for name in ("figure3_convnext", "figure5_convnext", "figure7_convnext"):
        for suffix in ("png", "pdf"):
            assert Path(f"figures/{name}.{suffix}").stat().st_size > 1000
    md = Path("figures/convnext_aggregates.md").read_text()
    assert "JPEG copy" in md and "hist_clean_adam" not in md and "clean, Adam ν ε=1e-05" in md
