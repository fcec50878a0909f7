"""The whole DVC pipeline on tiny parameters, in a temporary copy of the repository, the way
`make reproduce PROFILE=tiny` runs it: write the raw data, `dvc add` it (the hash must equal the
committed data.dvc), `dvc repro`; then a second `dvc repro` does nothing and a changed plot
parameter makes only the plot stage stale. Plus static checks of the DVC configuration."""

import configparser
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("split_digits", "train_mlp", "estimate_figure1", "plot_figure1", "train_poison_digits",
          "estimate_poison_digits", "plot_poison_digits", "fetch_pythia",
          "estimate_figure4", "estimate_figure2", "estimate_figure6", "plot_pythia",
          "prepare_cifar", "train_convnext", "estimate_figure5", "estimate_figure3",
          "estimate_figure7", "plot_convnext")


def repo_files() -> list[Path]:
    """Files a clone would have, including uncommitted ones: git's tracked + untracked files
    that are not ignored (falls back to a walk when git is unavailable)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO, check=True, capture_output=True).stdout
        files = [Path(p) for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "data", "results", ".dvc/cache", ".dvc/tmp"}
        files = [p.relative_to(REPO) for p in REPO.rglob("*")
                 if p.is_file() and not any(str(p.relative_to(REPO)).startswith(s) for s in skip)]
    return [f for f in files if (REPO / f).is_file()]


def fresh_copy(tmp_path: Path) -> Path:
    """``tmp_path/repo``: the files a clone would have (:func:`repo_files`), without dvc.lock,
    results/ or data/, as after a fresh clone."""
    work = tmp_path / "repo"
    for rel in repo_files():
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for stale in ("dvc.lock", "results", "data"):
        path = work / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return work


def run(cmd: list[str], cwd: Path) -> str:
    # the copy's own lib/ first, so that an edit to the copy's code is the code that runs
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(cwd / "lib"))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def _out_hashes(work: Path) -> dict[str, str]:
    """{out path: md5} of every stage's outs in dvc.lock."""
    lock = YAML(typ="safe").load((work / "dvc.lock").read_text())
    return {o["path"]: o.get("md5") for stage in lock["stages"].values() for o in stage.get("outs", [])}


def _log10_volumes(work: Path) -> dict[str, float]:
    """Every published estimate's log10 volume, keyed by experiment and estimate."""
    out = {}
    for path in sorted((work / "results").glob("*/figure*/estimates.json")):
        summary = json.loads(path.read_text())
        for key, record in summary["estimates"].items():
            out[f"{path.parent.name}/{key}"] = record["log10_volume"]
    return out


def test_dvc_config_turns_off_analytics_and_update_checks():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    assert config["core"]["analytics"] == "false"
    assert config["core"]["check_update"] == "false"


def test_dvc_yaml_structure():
    dvc = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())
    params = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    assert list(dvc["stages"]) == ["record_inputs", *STAGES]
    inputs = dvc["stages"]["record_inputs"]
    assert inputs["always_changed"] is True
    fingerprints = [next(iter(o)) for o in inputs["outs"]]
    readers = {"${paths.cifar_input}": {"prepare_cifar"},
               "${paths.tokenizer_input}": {"fetch_pythia"},
               "${paths.eval_text_input}": {"estimate_figure2", "estimate_figure4",
                                            "estimate_figure6"}}
    assert sorted(fingerprints) == sorted(readers)
    for fingerprint, stages in readers.items():
        assert {n for n, s in dvc["stages"].items() if fingerprint in s.get("deps", [])} == stages
    for name in STAGES:
        stage = dvc["stages"][name]
        assert stage["cmd"].startswith(f"python -m replication.pipeline run {name} notebooks/{name}.py")
        # code dependencies are folders (or the shared sweep, scale and poisoning modules), never
        # module hand lists
        code = [d for d in stage["deps"] if d.startswith("lib/")]
        assert {"lib/localvol", "lib/replication/pipeline", "lib/replication/sweep.py"} <= set(code)
        assert all(not d.endswith(".py") or d.endswith(("sweep.py", "scale.py", "poisoning.py", "__init__.py"))
                   for d in code), code
        keys = stage["params"]
        assert keys and all(isinstance(k, str) and k.count(".") == 1 for k in keys), \
            f"{name}: list single keys (section.key), not whole sections"
        for key in keys:
            section, leaf = key.split(".")
            assert leaf in params[section], key
        # the executed notebook is an out with cache: false
        executed = [o for o in stage["outs"] if isinstance(o, dict)
                    and next(iter(o)).endswith(f"/{name}.ipynb")]
        assert executed and next(iter(executed[0].values())) == {"cache": False}
    plots = [next(iter(p)) if isinstance(p, dict) else p for p in dvc["plots"]]
    assert sorted(p for p in plots if p.startswith("figures/")) == sorted(
        [f"figures/figure{n}_{e}.png" for n, e in
         [(1, "mlp"), (2, "pythia"), (3, "convnext"), (4, "pythia"), (5, "convnext"),
          (6, "pythia"), (7, "convnext")]] + ["figures/poison_digits.png"])
    # params sections are named after their stages, except the two shared cost sections and
    # the process count of the eight estimate stages
    assert set(params) - set(dvc["stages"]) == {"pythia_estimate", "convnext_estimate", "scale"}
    assert {n for n, s in dvc["stages"].items() if "scale.processes" in s.get("params", [])} == {
        *(f"estimate_figure{n}" for n in range(1, 8)), "estimate_poison_digits"}
    metrics = [m for s in dvc["stages"].values() for m in s.get("metrics", [])]
    assert len(metrics) == 11  # the three training stages and the eight estimate stages


@pytest.mark.slow
def test_dvc_repro_of_the_whole_pipeline_on_tiny_parameters(tmp_path):
    work = fresh_copy(tmp_path)
    shared = REPO.parent / "shared"  # ../shared/data/ (tokenizer, CIFAR-10 JPEGs) beside the clone
    if shared.exists():
        (tmp_path / "shared").symlink_to(shared)
    run(["git", "init", "-q"], work)  # DVC's repo is a git repo; no commit is needed
    python, dvc = str(BIN / "python"), str(BIN / "dvc")

    # what `make reproduce PROFILE=tiny` does
    run([python, "-m", "replication.pipeline", "apply-profile", "profiles/tiny.yaml"], work)
    # the tokenizer as a local copy this test may replace (an external input)
    tokenizer = tmp_path / "tokenizer" / "20B_tokenizer.json"
    tokenizer.parent.mkdir()
    source = YAML(typ="safe").load((work / "params.yaml").read_text())["fetch_pythia"]["tokenizer_path"]
    shutil.copy(work / source, tokenizer)
    (tmp_path / "tok.yaml").write_text(f"fetch_pythia:\n  tokenizer_path: {tokenizer}\n")
    run([python, "-m", "replication.pipeline", "apply-profile", str(tmp_path / "tok.yaml")], work)
    run([python, "-m", "replication.mlp.data", "write-data", "data/digits"], work)
    run([dvc, "add", "--quiet", "data"], work)
    assert (work / "data.dvc").read_text() == (REPO / "data.dvc").read_text(), \
        "the written raw data must hash to the committed data.dvc"
    out = run([dvc, "repro"], work)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
        assert (work / "results" / "notebooks" / f"{stage}.ipynb").exists()
    for name in ("figure1_mlp.png", "figure1_mlp.pdf", "figure1_mlp_aggregates.csv",
                 "figure1_mlp_aggregates.md", "figure2_pythia.png", "figure4_pythia.png",
                 "figure6_pythia.png", "pythia_aggregates.md", "figure3_convnext.png",
                 "figure5_convnext.pdf", "figure7_convnext.png", "convnext_aggregates.md"):
        assert (work / "figures" / name).stat().st_size > 0, name

    metrics = json.loads(run([dvc, "metrics", "show", "--json"], work))
    text = json.dumps(metrics)
    for key in ("naive", "hessian_e1", "log10_volume", "heldout_accuracy", "poisoned_smaller_naive",
                "val_accuracy"):
        assert key in text, key

    # nothing changed: nothing runs but the fingerprints of the external inputs
    out = run([dvc, "repro"], work)
    assert out.count("Running stage") == 1 and "Running stage 'record_inputs'" in out, out
    # finished estimate stages leave no resume state behind (issue 9 §1)
    assert not list((work / "results" / "progress").glob("*/*")), "stale progress files"

    # an identical forced rerun leaves every DVC-tracked out byte-identical (issue 9 §7): wall
    # times live in *.timings.json files that no stage declares
    lock = _out_hashes(work)
    run([dvc, "repro", "-f"], work)
    relock = _out_hashes(work)
    changed = sorted(p for p in lock if lock[p] != relock.get(p) and not p.endswith(".ipynb"))
    assert not changed, f"outs that differ between two identical runs: {changed}"

    # a code change that moves every per-sample term by exactly log 2 (issue 9 §1) reruns the
    # estimate stages and moves every published log10 volume by exactly log10 2
    volumes = _log10_volumes(work)
    ray = work / "lib" / "localvol" / "ray_integral.py"
    old = "return float(np.log(2.0) + 0.5 * n * np.log(np.pi) - gammaln(0.5 * n))"
    assert old in ray.read_text()
    ray.write_text(ray.read_text().replace(old, old[:-1] + " + np.log(2.0))"))
    out = run([dvc, "repro"], work)
    for figure in range(1, 8):
        assert f"Running stage 'estimate_figure{figure}'" in out
    moved = _log10_volumes(work)
    assert set(moved) == set(volumes) and len(volumes) >= 40  # every estimate of the tiny profile
    for key, value in volumes.items():
        assert moved[key] - value == pytest.approx(math.log10(2), abs=1e-6), key
    ray.write_text(ray.read_text().replace(old[:-1] + " + np.log(2.0))", old))
    run([dvc, "repro"], work)  # back to the real code for the check below
    # a plot parameter changed: only plot_figure1 is stale; Figure 6's cutoffs: only its stage
    (tmp_path / "bins.yaml").write_text("plot_figure1:\n  bins: 9\n")
    run([python, "-m", "replication.pipeline", "apply-profile", str(tmp_path / "bins.yaml")], work)
    status = json.loads(run([dvc, "status", "--json"], work))
    assert status.pop("record_inputs") == ["always changed"]
    assert list(status) == ["plot_figure1"], status
    (tmp_path / "cutoffs.yaml").write_text("estimate_figure6:\n  cutoffs: [1.0e-2, 1.0, 10.0]\n")
    run([python, "-m", "replication.pipeline", "apply-profile", str(tmp_path / "cutoffs.yaml")], work)
    status = json.loads(run([dvc, "status", "--json"], work))
    # (dvc status lists the stages whose own deps changed; plot_pythia follows when it runs)
    assert set(status) == {"record_inputs", "plot_figure1", "estimate_figure6"}, status
    # a replaced external input (same path, other bytes) makes exactly its reader stale once its
    # fingerprint is recorded
    tokenizer.write_text(tokenizer.read_text() + "\n")
    run([dvc, "repro", "record_inputs"], work)
    status = json.loads(run([dvc, "status", "--json"], work))
    assert set(status) == {"record_inputs", "plot_figure1", "estimate_figure6", "fetch_pythia"}
    assert {"changed deps": {"results/inputs/tokenizer.json": "modified"}} in status["fetch_pythia"]
