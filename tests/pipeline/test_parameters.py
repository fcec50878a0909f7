"""Pipeline plumbing: notebook parameter checking, dvc.yaml/params.yaml reading, profiles,
atomic result files."""

import json
import os
import stat
import textwrap
from pathlib import Path

import numpy as np
import pytest

from replication.pipeline import (
    ParameterError,
    apply_profile,
    atomic_path,
    check_parameters,
    notebook_setup,
    repository_root,
    save_npz_atomic,
    stage_parameters,
    write_json_atomic,
)

REPO = Path(__file__).resolve().parents[2]


def notebook_namespace(parameters_cell: str, injected: str = "") -> dict:
    """Run a parameters cell, then papermill's injected cell, the way a kernel would."""
    ns: dict = {"__name__": "__main__", "In": [""], "Out": {}, "_ih": [], "_": None}
    exec(compile(textwrap.dedent(parameters_cell), "<parameters>", "exec"), ns)
    exec(compile(textwrap.dedent(injected), "<injected-parameters>", "exec"), ns)
    return ns


CELL = """
seed: int = 0  # split seed
lr: float = 0.05  # peak learning rate
name: str = "mlp"
betas: list[float] = [0.9, 0.999]
batch_size: int | None = None
flags: dict[str, dict] = {"a": {"kind": "x", "eps": 0.1}}
"""


def test_defaults_pass_and_come_back_in_order():
    params = check_parameters(notebook_namespace(CELL))
    assert list(params) == ["seed", "lr", "name", "betas", "batch_size", "flags"]
    assert params["lr"] == 0.05 and params["batch_size"] is None


def test_injected_values_override_and_int_becomes_float():
    ns = notebook_namespace(CELL, "lr = 1\nseed = 3\nbatch_size = 16\nbetas = [0.5, 1]")
    params = check_parameters(ns)
    assert params["lr"] == 1.0 and isinstance(params["lr"], float)
    assert isinstance(ns["lr"], float)  # written back into the notebook's namespace
    assert params["betas"] == [0.5, 1.0] and params["batch_size"] == 16


def test_only_declared_parameters_are_checked_so_run_all_works_twice():
    """A second Run All in one kernel finds the notebook's own results (``P``, ``out``) in its
    namespace: they are not parameters. (An injected name that the parameters cell does not
    declare is refused before the run: test_notebook_parameters.py.)"""
    ns = notebook_namespace(CELL)
    first = check_parameters(ns)
    ns.update(P=first, out={"table": [1, 2]}, colour="red")
    assert check_parameters(ns) == first


def test_a_wrong_type_is_still_caught_on_the_second_run():
    ns = notebook_namespace(CELL)
    ns["P"] = check_parameters(ns)
    ns["seed"] = "zero"  # the user edits a value by hand between two runs
    with pytest.raises(ParameterError, match="parameter 'seed': expected int"):
        check_parameters(ns)


def test_repository_root_is_found_from_a_subfolder_and_notebook_setup_moves_there(
        tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert repository_root() == tmp_path.resolve()
    ns = notebook_namespace(CELL)
    for _ in range(2):  # idempotent: Run All twice
        assert notebook_setup(ns)["seed"] == 0
        assert Path.cwd() == tmp_path.resolve()


def test_a_parameter_renamed_between_two_runs_is_not_passed_twice(tmp_path, monkeypatch):
    """Run All, rename a parameter in the parameters cell, Run All again in the same kernel:
    only the current names are parameters (IPython keeps every annotation a kernel has seen)."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    ns = notebook_namespace("seed: int = 0\nn_train: int = 1024\n")
    assert notebook_setup(ns) == {"seed": 0, "n_train": 1024}
    exec("split_seed: int = 5\n", ns)  # the edited parameters cell, rerun
    assert notebook_setup(ns) == {"split_seed": 5}
    assert notebook_setup(ns) == {"split_seed": 5}  # the setup cell rerun alone


def test_repository_root_outside_a_repository_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no dvc.yaml in {tmp_path}"):
        repository_root()


@pytest.mark.parametrize("injected, message", [
    ("seed = 'zero'", "expected int"),
    ("seed = 1.5", "expected int"),
    ("seed = True", "expected int"),
    ("lr = '1e-2'", "YAML 1.1"),
    ("lr = None", "expected float"),
    ("name = 3", "expected str"),
    ("betas = 0.9", "expected a list"),
    ("betas = [0.9, 'x']", r"betas\[1\]"),
    ("batch_size = 'all'", "matches none"),
    ("flags = [1]", "expected a mapping"),
])
def test_ill_typed_parameter_is_an_error(injected, message):
    with pytest.raises(ParameterError, match=message):
        check_parameters(notebook_namespace(CELL, injected))


def test_modules_functions_and_private_names_are_not_parameters():
    ns = notebook_namespace(CELL, "")
    ns.update(np=np, check_parameters=check_parameters, _hidden=1, get_ipython=None)
    check_parameters(ns)


def test_a_notebook_without_annotations_is_an_error():
    with pytest.raises(ParameterError, match="annotated"):
        check_parameters(notebook_namespace("seed = 0\n"))


def test_stage_parameters_reads_only_the_listed_keys(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "a:\n  x: 1.0e-2\n  y: 1e-3\n  unused: 5\nb:\n  z: [1, 2]\n")
    (tmp_path / "other.yaml").write_text("c:\n  w: hello\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: x\n    params:\n      - a.x\n      - a.y\n      - b.z\n"
        "      - other.yaml:\n          - c.w\n")
    params = stage_parameters("s", tmp_path / "dvc.yaml", tmp_path / "params.yaml")
    # YAML 1.2 as DVC reads it: 1e-3 is a float here.
    assert params == {"x": 0.01, "y": 0.001, "z": [1, 2], "w": "hello"}


def test_stage_parameters_errors(tmp_path):
    (tmp_path / "params.yaml").write_text("a:\n  x: 1\nb:\n  x: 2\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: x\n    params: [a.x, b.x]\n  t:\n    cmd: x\n    params: [a.q]\n")
    with pytest.raises(ValueError, match="two parameters named 'x'"):
        stage_parameters("s", tmp_path / "dvc.yaml", tmp_path / "params.yaml")
    with pytest.raises(KeyError, match="a.q"):
        stage_parameters("t", tmp_path / "dvc.yaml", tmp_path / "params.yaml")
    with pytest.raises(KeyError, match="stage 'u'"):
        stage_parameters("u", tmp_path / "dvc.yaml", tmp_path / "params.yaml")


def test_every_repo_stage_resolves_its_parameters():
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        params = stage_parameters(stage, REPO / "dvc.yaml", REPO / "params.yaml")
        assert params, stage


def test_apply_profile_keeps_comments_and_rejects_unknown_keys(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:  # the training stage\n  lr: 0.05  # peak\n  epochs: 25\n"
                      "est:\n  k: 100\n")
    profile = tmp_path / "p.yaml"
    profile.write_text("train:\n  epochs: 2\nest:\n  k: 3\n")
    assert apply_profile(profile, params) == ["train.epochs", "est.k"]
    text = params.read_text()
    assert "# the training stage" in text and "# peak" in text
    assert "epochs: 2" in text and "k: 3" in text and "lr: 0.05" in text
    profile.write_text("train:\n  epochz: 2\n")
    with pytest.raises(KeyError, match="train.epochz"):
        apply_profile(profile, params)


def test_repo_profiles_apply_to_params_yaml(tmp_path):
    for profile in (REPO / "profiles").glob("*.yaml"):
        params = tmp_path / "params.yaml"
        params.write_text((REPO / "params.yaml").read_text())
        assert apply_profile(profile, params)


def test_atomic_writes(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "m.json",
                             {"a": np.float64(1.5), "b": np.arange(3), "c": float("inf")})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": None}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    npz = save_npz_atomic(tmp_path / "x.npz", a=np.ones(2))
    with np.load(npz) as z:
        assert z["a"].tolist() == [1.0, 1.0]
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "never.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert not (tmp_path / "never.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
