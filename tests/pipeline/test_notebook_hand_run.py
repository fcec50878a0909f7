"""A stage notebook run by hand, as in JupyterLab: Run All twice in ONE kernel started in
notebooks/ (JupyterLab's working directory for a notebook there), in a minimal copy of the
repository. Both runs must succeed (the first cell's chdir to the repository root must not break
the second), write the same bytes to results/scratch/<stage>/, and write nothing else: in
particular nothing over the stage's declared outs (the pipeline's results)."""

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _snapshot(root: Path) -> dict[str, str]:
    """{path relative to root: sha256} of every file under root (empty when missing)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _declared_outs(work: Path, stage: str) -> list[str]:
    """The outs (and metrics) dvc.yaml declares for ``stage``, ``${paths.x}`` resolved."""
    from replication.pipeline.parameters import load_yaml

    dvc = load_yaml(work / "dvc.yaml")
    paths = {k: v for entry in dvc.get("vars", []) if isinstance(entry, dict)
             for k, v in entry.get("paths", {}).items()}
    entries = dvc["stages"][stage].get("outs", []) + dvc["stages"][stage].get("metrics", [])
    names = [e if isinstance(e, str) else next(iter(e)) for e in entries]
    return [re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], n) for n in names]


def _minimal_copy(tmp_path: Path, stage: str) -> Path:
    from replication.mlp.data import write_raw_data

    work = tmp_path / "repo"
    for rel in ("dvc.yaml", "params.yaml", f"notebooks/{stage}.py", f"notebooks/{stage}.ipynb"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, work / rel)
    write_raw_data(work / "data" / "digits")
    return work


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["split_digits", "train_mlp"])
def test_run_all_twice_in_one_kernel_started_in_notebooks(tmp_path, stage):
    import nbformat
    from nbclient import NotebookClient

    work = _minimal_copy(tmp_path, stage)
    if stage == "train_mlp":  # its input, as the pipeline's split_digits stage leaves it
        from replication.mlp.data import split_stage

        split_stage(data_dir=str(work / "data" / "digits"),
                    split_path=str(work / "results" / "mlp" / "split.npz"), seed=0, n_train=1024)
    outs = _declared_outs(work, stage)
    assert outs and all(o.startswith(("results/", "figures/")) for o in outs), outs
    before = _snapshot(work)
    scratch = work / "results" / "scratch" / stage

    notebook = nbformat.read(work / "notebooks" / f"{stage}.ipynb", as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(work / "notebooks")}})
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
    written = []
    with client.setup_kernel(env=env):
        for run in (1, 2):
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)  # raises CellExecutionError if a cell fails
            errors = [o for c in notebook.cells for o in c.get("outputs", [])
                      if o.get("output_type") == "error"]
            assert not errors, f"run {run}: {errors}"
            written.append(_snapshot(scratch))
            if run == 1:
                shutil.rmtree(scratch)  # so that the second run must write everything again
    assert written[0], f"the hand run wrote nothing under {scratch}"
    assert set(written[0]) == set(written[1]), "the two runs wrote different files"
    # wall times go to *.timings.json (declared by no stage); everything else is deterministic
    same = {p: h for p, h in written[0].items() if not p.endswith(".timings.json")}
    assert same == {p: written[1][p] for p in same}, "the two runs wrote different bytes"
    if stage == "split_digits":
        assert set(written[0]) == {"split.npz"}
    else:
        assert {"model/model.safetensors", "train_history.csv", "train_metrics.json"} <= set(written[0])

    after = _snapshot(work)
    changed = sorted(p for p in after if before.get(p) != after[p])
    assert all(p.startswith(f"results/scratch/{stage}/") for p in changed), \
        f"a hand run wrote outside results/scratch/{stage}/: {changed}"
    assert set(before) <= set(after), "a hand run deleted files"
    for out in outs:
        assert not any(p == out or p.startswith(out + "/") for p in changed), out
        assert (work / out).exists() == any(p == out or p.startswith(out + "/") for p in before), out
