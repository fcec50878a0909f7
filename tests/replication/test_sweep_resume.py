"""Issue 9 §1: samples computed by other code are never resumed.

The resume files of the estimate stages were keyed by settings, weights and cost but not by the
code, so after a change to the estimator a rerun loaded every finished sample back and the
published numbers did not move. Here a copy of the package is edited the way the issue did it
(``+ math.log(2)`` in ``log_unit_sphere_area``, which shifts every per-sample log term by
exactly log 2 and changes no radius) and run in fresh interpreters, so the real source files
are what is hashed."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import localvol
from localvol.code_version import source_hash
from replication.sweep import code_version

LIB = Path(localvol.__file__).resolve().parents[1]
PACKAGE = LIB / "localvol"

SCRIPT = r'''
import json, sys
import torch
from torch import nn
import localvol as lv
from replication.sweep import Point, Unit, run_sweep

mode, where = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
kl = lv.ExpectedKL(model, x)
calls = [0]

def cost(theta):
    calls[0] += 1
    if mode.endswith("interrupted") and calls[0] > 8:  # after the first batch was saved
        raise KeyboardInterrupt
    return kl(theta)

kw = dict(cutoff=1e-2, n_samples=12, prior=lv.GaussianPrior(1.0), rtol=1e-2, seed=0,
          batch_size=4)
try:
    if mode.startswith("library"):
        est = lv.estimate_log_volume(cost, anchor, progress=False, checkpoint_path=where, **kw)
        samples = est.samples
    else:
        unit = Unit(key="k", checkpoint="only", series="naive", preconditioner="naive",
                    cutoff=kw["cutoff"], n_samples=kw["n_samples"])
        sweep = run_sweep([unit], lambda _: Point(anchor=anchor, cost=cost), prior=kw["prior"],
                          rtol=kw["rtol"], seed=kw["seed"], batch_size=4, exponent=0.5,
                          progress_dir=where, progress=False)
        samples = sweep.arrays["k__samples"]
except KeyboardInterrupt:
    print(json.dumps("interrupted"))
else:
    print(json.dumps(samples.tolist()))
'''


@pytest.fixture
def package_copy(tmp_path):
    root = tmp_path / "lib"
    for package in ("localvol", "replication"):
        shutil.copytree(LIB / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "script.py").write_text(SCRIPT)
    return tmp_path


def _run(copy: Path, mode: str, where: Path):
    env = dict(os.environ, PYTHONPATH=str(copy / "lib"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(copy / "script.py"), mode, str(where)],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        return proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _edit_code(copy: Path) -> None:
    """The issue's simulated code change: every log term moves by exactly log 2."""
    path = copy / "lib" / "localvol" / "ray_integral.py"
    text = path.read_text()
    old = "return float(np.log(2.0) + 0.5 * n * np.log(np.pi) - gammaln(0.5 * n))"
    assert text.count(old) == 1
    path.write_text(text.replace(old, old[:-1] + " + math.log(2))").replace(
        "import numpy as np\n", "import math\n\nimport numpy as np\n", 1))


def test_source_hash_follows_every_source_file(package_copy):
    copy = package_copy / "lib" / "localvol"
    assert source_hash(copy) == source_hash()  # the copy is the installed code
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.pyc").write_bytes(b"junk")
    assert source_hash(copy) == source_hash()  # bytecode is not source
    _edit_code(package_copy)
    edited = source_hash(copy)
    assert code_version() != _code_version_of(package_copy)  # the sweep's key follows it too
    assert edited != source_hash()
    (copy / "extra.py").write_text("")
    assert source_hash(copy) not in (edited, source_hash())


@pytest.mark.slow
def test_stage_resume_files_from_other_code_are_not_reused(package_copy, tmp_path):
    """replication.sweep.run_sweep (every estimate stage): an interrupted run under the old
    code leaves progress; after the code change the rerun recomputes every sample."""
    before = _run(package_copy, "records", tmp_path / "clean")
    assert len(before) == 12
    assert _run(package_copy, "records-interrupted", tmp_path / "progress") == "interrupted"
    assert list((tmp_path / "progress").glob("*/shard-0.npz")), "the interrupted run left no progress file"
    _edit_code(package_copy)
    after = _run(package_copy, "records", tmp_path / "progress")
    np.testing.assert_allclose(np.asarray(after) - np.asarray(before), math.log(2), rtol=0, atol=1e-9)


@pytest.mark.slow
def test_library_checkpoint_from_other_code_is_refused(package_copy, tmp_path):
    """estimate_log_volume(checkpoint_path=...): a file written by other code is an error that
    says so, never a silent resume."""
    path = tmp_path / "est.npz"
    assert _run(package_copy, "library-interrupted", path) == "interrupted"
    assert path.exists()
    _edit_code(package_copy)
    err = _run(package_copy, "library", path)
    assert isinstance(err, str) and "another version of localvol" in err


def _code_version_of(copy: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(copy / "lib"))
    proc = subprocess.run([sys.executable, "-c", "from replication.sweep import code_version; print(code_version())"],
                          capture_output=True, text=True, env=env, check=True)
    return proc.stdout.strip()
