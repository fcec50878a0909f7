"""run_notebook refuses, before executing or writing anything, a notebook whose injected
parameters would be silently ignored: no (or several) cells tagged ``parameters``, or an injected
name that the ``parameters`` cell does not declare (issue 9)."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from ruamel.yaml import YAML

from replication.pipeline import ParameterError, declared_parameters, run_notebook
from replication.pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[2]
DVC = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())
# stages that run a notebook (record_inputs is a plain command)
STAGES = {n: s for n, s in DVC["stages"].items() if "replication.pipeline run" in s["cmd"]}

PARAMETERS = 'out: str = "default.txt"  # output\ntext: str = "hello"\n'


def make_notebook(path: Path, *, tags=("parameters",), parameters: str = PARAMETERS,
                  extra_tagged: bool = False) -> Path:
    """A tiny stage notebook in the project's layout: parameters cell, check, a cell writing
    ``out``."""
    cells = [
        nbformat.v4.new_markdown_cell("# tiny stage"),
        nbformat.v4.new_code_cell(parameters, metadata={"tags": list(tags)}),
        nbformat.v4.new_code_cell(
            "from replication.pipeline import check_parameters\nP = check_parameters(globals())"),
        nbformat.v4.new_code_cell("from pathlib import Path\nPath(out).write_text(text)"),
    ]
    if extra_tagged:
        cells.insert(2, nbformat.v4.new_code_cell('out = "other.txt"',
                                                  metadata={"tags": ["parameters"]}))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    return path


def nothing_written(work: Path, executed: Path) -> None:
    assert not executed.exists() and not executed.parent.exists()
    assert not (work / "injected.txt").exists() and not (work / "default.txt").exists()


def test_untagged_parameters_cell_raises_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = make_notebook(tmp_path / "stage.ipynb", tags=())
    executed = tmp_path / "executed" / "stage.ipynb"
    with pytest.raises(ParameterError, match=r"stage\.ipynb: found 0 cells tagged") as err:
        run_notebook(nb, executed, {"out": "injected.txt"}, stream=False)
    assert '"tags": ["parameters"]' in str(err.value)
    assert "property inspector" in str(err.value)
    nothing_written(tmp_path, executed)


def test_two_tagged_parameters_cells_raise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = make_notebook(tmp_path / "stage.ipynb", extra_tagged=True)
    executed = tmp_path / "executed" / "stage.ipynb"
    with pytest.raises(ParameterError,
                       match=r"stage\.ipynb: found 2 cells tagged 'parameters' \(cells 1, 2\)"):
        run_notebook(nb, executed, {"out": "injected.txt"}, stream=False)
    nothing_written(tmp_path, executed)


def test_tagged_markdown_cell_is_not_a_parameters_cell(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("out = 1", metadata={"tags": ["parameters"]})])
    nbformat.write(nb, tmp_path / "md.ipynb")
    with pytest.raises(ParameterError, match="markdown cell"):
        declared_parameters(tmp_path / "md.ipynb")


def test_undeclared_injected_name_raises_and_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = make_notebook(tmp_path / "stage.ipynb")
    executed = tmp_path / "executed" / "stage.ipynb"
    with pytest.raises(ParameterError) as err:
        run_notebook(nb, executed, {"out": "injected.txt", "outt": "x", "colour": "red"},
                     stream=False)
    message = str(err.value)
    assert "'outt' (did you mean 'out'?)" in message and "'colour'" in message
    assert "declares: out, text" in message
    nothing_written(tmp_path, executed)


def test_correct_notebook_runs_with_the_injected_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = make_notebook(tmp_path / "stage.ipynb")
    executed = tmp_path / "executed" / "stage.ipynb"
    run_notebook(nb, executed, {"out": "injected.txt", "text": "injected"}, stream=False)
    assert (tmp_path / "injected.txt").read_text() == "injected"
    assert not (tmp_path / "default.txt").exists()
    assert executed.exists()


def test_declared_parameters_reads_top_level_assignments_in_order(tmp_path):
    source = (
        "# comment\n"
        "seed: int = 0  # split seed\n"
        "lr = 0.05\n"
        "a = b = 1\n"
        "c, d = 2, 3\n"
        "bare: int\n"
        "seed: int = 1\n"
        "if True:\n    nested = 1\n"
        "def f():\n    inner = 2\n"
        "%matplotlib inline\n"
    )
    nb = make_notebook(tmp_path / "p.ipynb", parameters=source)
    assert declared_parameters(nb) == ["seed", "lr", "a", "b", "c", "d", "bare"]


def test_parameters_cell_with_a_syntax_error_is_reported(tmp_path):
    nb = make_notebook(tmp_path / "p.ipynb", parameters="seed: int = \n")
    with pytest.raises(ParameterError, match="not valid Python"):
        declared_parameters(nb)


def test_injected_cell_before_the_parameters_cell_raises(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('out = "x"', metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
    ])
    nbformat.write(nb, tmp_path / "p.ipynb")
    with pytest.raises(ParameterError, match="injected-parameters"):
        declared_parameters(tmp_path / "p.ipynb")


def test_stage_cli_rejects_a_dvc_key_the_notebook_no_longer_declares(tmp_path, monkeypatch):
    """A key removed from the parameters cell but still listed in dvc.yaml fails the stage."""
    monkeypatch.chdir(tmp_path)
    make_notebook(tmp_path / "stage.ipynb")
    (tmp_path / "params.yaml").write_text("tiny:\n  seed: 3\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  tiny:\n    cmd: x\n    params:\n      - tiny.seed\n")
    with pytest.raises(SystemExit, match="ParameterError: .*'seed'"):
        main(["run", "tiny", "stage.ipynb", "executed/stage.ipynb", "-p", "out", "injected.txt"])
    nothing_written(tmp_path, tmp_path / "executed" / "stage.ipynb")


def test_stage_cli_names_the_params_key_of_an_ill_typed_value(tmp_path, monkeypatch):
    """A wrong type in params.yaml stops the stage before the kernel starts, naming the key a
    user edits (the section, not the notebook's short name)."""
    monkeypatch.chdir(tmp_path)
    make_notebook(tmp_path / "stage.ipynb", parameters='out: str = "x"\nseed: int = 0\n')
    (tmp_path / "params.yaml").write_text("tiny:\n  seed: 'three'\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  tiny:\n    cmd: x\n    params:\n      - tiny.seed\n")
    with pytest.raises(SystemExit, match=r"'params.yaml tiny.seed': expected int, got str"):
        main(["run", "tiny", "stage.ipynb", "executed/stage.ipynb", "-p", "out", "injected.txt"])
    nothing_written(tmp_path, tmp_path / "executed" / "stage.ipynb")


def test_a_failing_stage_lists_the_params_keys_of_its_names(tmp_path, monkeypatch, capsys):
    """An error raised by library code names the notebook's short name (``seed``); the runner
    then says which params.yaml key that is, and leaves the executed copy (read-only) with the
    failing cell."""
    monkeypatch.chdir(tmp_path)
    make_notebook(tmp_path / "stage.ipynb", parameters='out: str = "x"\nseed: int = 0\n')
    nb = nbformat.read(tmp_path / "stage.ipynb", as_version=4)
    nb.cells[-1].source = "if seed < 0:\n    raise ValueError(f'seed must be >= 0, got {seed}')"
    nbformat.write(nb, tmp_path / "stage.ipynb")
    (tmp_path / "params.yaml").write_text("tiny:\n  seed: -1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  tiny:\n    cmd: x\n    params:\n      - tiny.seed\n")
    with pytest.raises(SystemExit, match="ValueError: seed must be >= 0, got -1"):
        main(["run", "tiny", "stage.ipynb", "executed/stage.ipynb", "-p", "out", "injected.txt"])
    assert "seed = tiny.seed" in capsys.readouterr().err
    executed = tmp_path / "executed" / "stage.ipynb"
    assert executed.exists() and not os.access(executed, os.W_OK) or os.geteuid() == 0
    assert oct(executed.stat().st_mode & 0o777) == "0o444"


def stage_notebook_and_keys(stage: str) -> tuple[Path, set[str]]:
    from replication.pipeline import stage_parameters

    cmd = " ".join(STAGES[stage]["cmd"].split())
    match = re.search(r"replication\.pipeline run (\S+) (\S+)", cmd)
    assert match and match.group(1) == stage, cmd
    keys = set(stage_parameters(stage, REPO / "dvc.yaml", REPO / "params.yaml"))
    keys |= set(re.findall(r"-p (\w+) ", cmd))
    return REPO / match.group(2), keys


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_repo_stage_notebook_declares_what_dvc_yaml_passes(stage):
    notebook, keys = stage_notebook_and_keys(stage)
    declared = declared_parameters(notebook)
    assert keys <= set(declared), f"{stage}: undeclared {sorted(keys - set(declared))}"


def test_every_notebook_has_one_parameters_cell():
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb")) + sorted(
        (REPO / "notebooks").glob("*.py"))
    assert notebooks
    for notebook in notebooks:
        assert declared_parameters(notebook), notebook


def test_stage_cli_names_a_params_key_the_notebook_renamed(tmp_path, monkeypatch):
    """params.yaml and dvc.yaml still pass `seed`, the notebook now declares `split_seed`:
    the message names the key to rename, not only the notebook's short name."""
    monkeypatch.chdir(tmp_path)
    make_notebook(tmp_path / "stage.ipynb", parameters='out: str = "x"\nsplit_seed: int = 0\n')
    (tmp_path / "params.yaml").write_text("tiny:\n  seed: 3\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  tiny:\n    cmd: x\n    params:\n      - tiny.seed\n")
    with pytest.raises(SystemExit, match=r"params.yaml tiny.seed is passed to the notebook as "
                       r"'seed', which its parameters cell does not declare \(out, split_seed\)"):
        main(["run", "tiny", "stage.ipynb", "executed/stage.ipynb", "-p", "out", "injected.txt"])
    nothing_written(tmp_path, tmp_path / "executed" / "stage.ipynb")


def test_stage_cli_unknown_stage_or_notebook_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_notebook(tmp_path / "stage.ipynb")
    (tmp_path / "params.yaml").write_text("tiny:\n  seed: 3\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  tiny:\n    cmd: x\n    params:\n      - tiny.seed\n")
    with pytest.raises(SystemExit, match=r"\[tnyi\] KeyError: .*stage 'tnyi' not in dvc.yaml; "
                       r"stages: tiny"):
        main(["run", "tnyi", "stage.ipynb", "executed/stage.ipynb"])
    with pytest.raises(SystemExit, match=r"\[tiny\] no notebook missing.py"):
        main(["run", "tiny", "missing.py", "executed/stage.ipynb"])
