"""Each stage notebook executed through papermill with tiny parameters, in order, in a temporary
directory; plus the contract between notebooks, params.yaml and dvc.yaml."""

import json
import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
from ruamel.yaml import YAML

from localvol import digits
from localvol.stages import run_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
STAGES = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]


def parameters_cell(name: str) -> str:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: exactly one cell tagged 'parameters'"
    return cells[0].source


def declared_defaults(name: str) -> dict:
    ns: dict = {}
    exec(parameters_cell(name), ns)
    return {k: ns[k] for k in ns["__annotations__"]}


@pytest.mark.parametrize("stage", list(STAGES))
def test_notebook_layout_and_defaults_match_params_and_dvc_yaml(stage):
    """Parameters cell first (after the title), then the check; every declared parameter is fed
    by dvc.yaml (a params key or a -p path) and its default equals params.yaml's value and the
    path dvc.yaml passes, so running the notebook by hand reproduces the default run."""
    from localvol.stages import stage_parameters

    nb = nbformat.read(NOTEBOOKS / f"{stage}.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "check_parameters(globals())" in code[1].source
    assert all(not c.get("outputs") for c in code), "commit notebooks without outputs"

    defaults = declared_defaults(stage)
    from_params = stage_parameters(stage, REPO / "dvc.yaml", REPO / "params.yaml")
    cmd = STAGES[stage]["cmd"]
    paths = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["vars"][0]["paths"]
    passed = {m.group(1): paths[m.group(2)]
              for m in re.finditer(r"-p (\w+) \$\{paths\.(\w+)\}", cmd)}
    assert set(defaults) == set(from_params) | set(passed)
    for key, value in from_params.items():
        assert defaults[key] == value, f"{stage}.{key}: notebook {defaults[key]!r} != {value!r}"
    for key, value in passed.items():
        assert defaults[key] == value, key
    assert f"notebooks/{stage}.ipynb" in cmd and f"/{stage}.ipynb" in cmd


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("notebooks")
    digits.write_raw_data(work / "data" / "digits")
    return work


TINY = {
    "split_digits": {},
    "train_mlp": {"hidden": 6, "epochs": 2},
    "estimate_mlp": {
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
    "plot_mlp": {"bins": 5, "dpi": 40},
}


@pytest.mark.slow
def test_stage_notebooks_run_in_order_with_tiny_parameters(workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the notebooks' default paths are relative to the repo root
    for stage, params in TINY.items():
        run_notebook(NOTEBOOKS / f"{stage}.ipynb", workdir / "executed" / f"{stage}.ipynb",
                     params, stream=False)

    train, held = digits.load_split("results/digits/split.npz")
    assert (len(train), len(held)) == (1024, 773)
    metrics = json.loads(Path("results/mlp/train_metrics.json").read_text())
    assert metrics["n_parameters"] == 64 * 6 + 6 + 6 * 10 + 10
    summary = json.loads(Path("results/mlp/estimates.json").read_text())
    assert list(summary["estimates"]) == ["naive", *TINY["estimate_mlp"]["preconditioners"]]
    for name, r in summary["estimates"].items():
        assert np.isfinite(r["log10_volume"]), name
        assert r["log10_volume"] <= r["max_sample_log10"] + 1e-9
        assert r["cost_evaluations"] > 0 and "wall_time_s" not in r  # DVC outs hold no timings
        assert r["preconditioner_is_identity"] == (name == "naive")
    timings = json.loads(Path("results/mlp/estimates.timings.json").read_text())
    assert all(timings["estimates"][name] > 0 for name in summary["estimates"])
    assert not Path("results/checkpoints/estimate_mlp").exists()  # no resume state left behind
    with np.load("results/mlp/samples.npz") as z:
        assert z["naive__samples"].shape == (12,) and z["hesscale__samples"].shape == (6,)
    em = json.loads(Path("results/mlp/estimate_metrics.json").read_text())
    assert em["naive"]["log10_volume"] == pytest.approx(summary["estimates"]["naive"]["log10_volume"])
    for suffix in ("png", "pdf"):
        assert Path(f"figures/figure1_mlp.{suffix}").stat().st_size > 1000
    table = Path("figures/figure1_mlp_aggregates.csv").read_text().splitlines()
    assert table[0].startswith("name,preconditioner,k,log10_volume")
    assert len(table) == 1 + 1 + len(TINY["estimate_mlp"]["preconditioners"])
    assert "σ = 1.3975" in Path("figures/figure1_mlp_aggregates.md").read_text()
    # the executed copies keep the injected parameters
    executed = nbformat.read(workdir / "executed" / "train_mlp.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "hidden = 6" in injected[0].source


def test_mistyped_notebook_parameter_fails_the_run(tmp_path, monkeypatch):
    """papermill only warns about an unknown parameter; run_notebook refuses it before running,
    and the notebook's own check refuses an ill-typed value (more: tests/test_stages.py)."""
    import papermill

    from localvol.stages import ParameterError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParameterError, match="did you mean 'n_train'"):
        run_notebook(NOTEBOOKS / "split_digits.ipynb", tmp_path / "out.ipynb",
                     {"n_trian": 10}, stream=False)
    assert not (tmp_path / "out.ipynb").exists()
    with pytest.raises(papermill.PapermillExecutionError, match="expected int"):
        run_notebook(NOTEBOOKS / "split_digits.ipynb", tmp_path / "out.ipynb",
                     {"n_train": "ten"}, stream=False)
