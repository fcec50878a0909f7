"""The contract between the stage notebooks, params.yaml and dvc.yaml: every stage's notebook
has the project's thin layout (title, ``parameters`` cell, check, one library call, at most one
display cell), declares exactly the names dvc.yaml injects with defaults equal to params.yaml's
values and dvc.yaml's paths; and a mistyped parameter fails the run."""

import io
import re
import tokenize
from pathlib import Path

import nbformat
import pytest
from ruamel.yaml import YAML

from replication.pipeline import ParameterError, run_notebook, stage_parameters

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
DVC = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())
STAGES = DVC["stages"]
PATHS = DVC["vars"][0]["paths"]
CHECK = ("from replication.pipeline import check_parameters\n\n"
         "P = check_parameters(globals())  # unknown or ill-typed parameters are errors")


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
def test_notebook_layout(stage):
    """Title (markdown), then the ``parameters`` cell, the check, one library call and at most
    one display cell; kernel python3; committed without outputs; the parameters cell holds only
    annotated literals whose comments contain no '='."""
    nb = nbformat.read(NOTEBOOKS / f"{stage}.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert f"`{stage}`" in nb.cells[0].source, "the title cell names its stage"
    code = nb.cells[1:]
    assert all(c.cell_type == "code" for c in code)
    assert 3 <= len(code) <= 4, "parameters, check, one library call, optionally one display"
    assert "parameters" in code[0].metadata.get("tags", [])
    assert code[1].source == CHECK
    assert all(not c.get("outputs") for c in code), "commit notebooks without outputs"
    source = code[0].source
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT]
    assert not [c for c in comments if "=" in c], "parameters-cell comments must not contain '='"
    import ast

    for node in ast.parse(source).body:
        assert isinstance(node, ast.AnnAssign), f"{stage}: `name: type = value` only"
        ast.literal_eval(node.value)


@pytest.mark.parametrize("stage", list(STAGES))
def test_notebook_defaults_match_params_and_dvc_yaml(stage):
    """Every declared parameter is fed by dvc.yaml (a params key or a -p path) and its default
    equals params.yaml's value and the path dvc.yaml passes, so running the notebook by hand
    reproduces the default run."""
    defaults = declared_defaults(stage)
    from_params = stage_parameters(stage, REPO / "dvc.yaml", REPO / "params.yaml")
    cmd = STAGES[stage]["cmd"]
    passed = {m.group(1): PATHS[m.group(2)]
              for m in re.finditer(r"-p (\w+) \$\{paths\.(\w+)\}", cmd)}
    assert set(defaults) == set(from_params) | set(passed)
    for key, value in from_params.items():
        assert defaults[key] == value, f"{stage}.{key}: notebook {defaults[key]!r} != {value!r}"
    for key, value in passed.items():
        assert defaults[key] == value, key
    assert f"notebooks/{stage}.ipynb" in cmd and f"/{stage}.ipynb" in cmd


def test_every_notebook_is_a_stage():
    """No notebook is left behind that no stage runs (renamed stages remove the old one)."""
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(STAGES)


def test_mistyped_notebook_parameter_fails_the_run(tmp_path, monkeypatch):
    """papermill only warns about an unknown parameter; run_notebook refuses it before running,
    and the notebook's own check refuses an ill-typed value (more: test_parameters.py)."""
    import papermill

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParameterError, match="did you mean 'n_train'"):
        run_notebook(NOTEBOOKS / "split_digits.ipynb", tmp_path / "out.ipynb",
                     {"n_trian": 10}, stream=False)
    assert not (tmp_path / "out.ipynb").exists()
    with pytest.raises(papermill.PapermillExecutionError, match="expected int"):
        run_notebook(NOTEBOOKS / "split_digits.ipynb", tmp_path / "out.ipynb",
                     {"n_train": "ten"}, stream=False)
