"""The contract between the stage notebooks, params.yaml and dvc.yaml: every stage's notebook
is a Jupytext pair (X.ipynb, X.py) in step, which dvc.yaml runs and depends on through X.py; it
has the project's thin layout (title, ``parameters`` cell, setup, one library call, at most one
display cell), declares exactly the names dvc.yaml injects with defaults equal to params.yaml's
values and dvc.yaml's input paths, while its output paths default to results/scratch/<stage>/
(a hand run never writes over the pipeline's outs); and a mistyped parameter fails the run."""

import io
import re
import tokenize
from pathlib import Path

import nbformat
import pytest
from ruamel.yaml import YAML

from replication.pipeline import (
    NotebookPairError,
    ParameterError,
    read_notebook,
    run_notebook,
    stage_parameters,
)

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
DVC = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())
# stages that run a notebook (record_inputs is a plain command)
STAGES = {n: s for n, s in DVC["stages"].items() if "replication.pipeline run" in s["cmd"]}
PATHS = DVC["vars"][0]["paths"]
CHECK = ("from replication.pipeline import notebook_setup\n\n"
         "P = notebook_setup(globals())  # checks the parameters above; runs from the repository root")


def parameters_cell(name: str) -> str:
    nb = read_notebook(NOTEBOOKS / f"{name}.py")
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
    ipynb = nbformat.read(NOTEBOOKS / f"{stage}.ipynb", as_version=4)
    assert ipynb.metadata["kernelspec"]["name"] == "python3"
    assert all(not c.get("outputs") for c in ipynb.cells), "commit notebooks without outputs"
    nb = read_notebook(NOTEBOOKS / f"{stage}.py")  # raises unless the pair is in step
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
    """Every declared parameter is fed by dvc.yaml (a params key or a -p path). Its default
    equals params.yaml's value and, for an input, the path dvc.yaml passes, so running the
    notebook by hand reads the pipeline's results with the default settings; an output (a DVC
    out or metrics file, or the progress folder) defaults to results/scratch/<stage>/, never
    to any stage's out."""
    defaults = declared_defaults(stage)
    from_params = stage_parameters(stage, REPO / "dvc.yaml", REPO / "params.yaml")
    cmd = STAGES[stage]["cmd"]
    passed = {m.group(1): PATHS[m.group(2)]
              for m in re.finditer(r"-p (\w+) \$\{paths\.(\w+)\}", cmd)}
    assert set(defaults) == set(from_params) | set(passed)
    for key, value in from_params.items():
        assert defaults[key] == value, f"{stage}.{key}: notebook {defaults[key]!r} != {value!r}"
    outs = {resolve(o if isinstance(o, str) else next(iter(o)))
            for s in STAGES.values() for o in s.get("outs", []) + s.get("metrics", [])}
    own = {resolve(o if isinstance(o, str) else next(iter(o)))
           for o in STAGES[stage].get("outs", []) + STAGES[stage].get("metrics", [])}
    for key, value in passed.items():
        if value in own or key == "progress_dir":  # an output of this stage
            assert defaults[key].startswith(f"results/scratch/{stage}/"), (stage, key)
            assert not any(defaults[key] == o or defaults[key].startswith(o + "/")
                           for o in outs), (stage, key)
        else:  # an input: another stage's out, or raw data
            assert defaults[key] == value, (stage, key)
    assert f"notebooks/{stage}.py" in cmd and f"/{stage}.ipynb" in cmd
    assert f"notebooks/{stage}.py" in STAGES[stage]["deps"]
    assert not any(d.endswith(".ipynb") for d in STAGES[stage]["deps"]), \
        "stages depend on the .py of the pair, so opening the .ipynb invalidates nothing"


def resolve(path: str) -> str:
    return re.sub(r"\$\{paths\.(\w+)\}", lambda m: PATHS[m.group(1)], path)


def test_a_pair_out_of_step_is_refused_before_running(tmp_path, monkeypatch):
    """An .ipynb edited without Jupytext (its .py not updated) would make dvc repro run other
    code than the user sees: the runner refuses it, naming both files and the fix."""
    import shutil

    for suffix in (".py", ".ipynb"):
        shutil.copy(NOTEBOOKS / f"split_digits{suffix}", tmp_path / f"split_digits{suffix}")
    nb = nbformat.read(tmp_path / "split_digits.ipynb", as_version=4)
    nb.cells[-1].source += "\nprint('edited outside Jupytext')"
    nbformat.write(nb, tmp_path / "split_digits.ipynb")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotebookPairError, match=r"hold different cells \(first difference: "
                       r"cell \d+.*jupytext --sync"):
        run_notebook(tmp_path / "split_digits.py", tmp_path / "out.ipynb", {}, stream=False)
    assert not (tmp_path / "out.ipynb").exists()


def test_every_notebook_is_a_stage():
    """No notebook is left behind that no stage runs (renamed stages remove the old one)."""
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(STAGES)
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.py")) == sorted(STAGES)


def test_mistyped_notebook_parameter_fails_the_run(tmp_path, monkeypatch):
    """papermill only warns about an unknown parameter; run_notebook refuses it before running,
    and the notebook's own check refuses an ill-typed value (more: test_parameters.py)."""
    import papermill

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParameterError, match="did you mean 'n_train'"):
        run_notebook(NOTEBOOKS / "split_digits.py", tmp_path / "out.ipynb",
                     {"n_trian": 10}, stream=False)
    assert not (tmp_path / "out.ipynb").exists()
    with pytest.raises(papermill.PapermillExecutionError, match="expected int"):
        run_notebook(NOTEBOOKS / "split_digits.py", tmp_path / "out.ipynb",
                     {"n_train": "ten"}, stream=False)


@pytest.mark.parametrize("stage", list(STAGES))
def test_papermill_sees_every_declared_parameter(stage):
    """papermill's own parser of the parameters cell (what `papermill --help-notebook` prints,
    and what decides whether it warns "Passed unknown parameter") finds exactly the declared
    names, with their types."""
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node

    nb = load_notebook_node(str(NOTEBOOKS / f"{stage}.ipynb"))  # as papermill reads it
    inferred = {p.name: p.inferred_type_name for p in _infer_parameters(nb)}
    defaults = declared_defaults(stage)
    assert list(inferred) == list(defaults)
    assert all(inferred[name] != "None" for name in inferred), inferred
