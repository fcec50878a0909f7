"""Sharded estimates under torchrun (CPU, gloo): the merged estimate is the same bit for bit
for W = 1, 2 and 3 ranks, and a rank killed mid-run and restarted (--max-restarts) loses no
finished sample and computes none twice."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("distributed_worker.py")
FIELDS = ("samples", "radii", "evaluations", "cost_at_radius", "direction_norms", "log_volume",
          "cost_evaluations")
pytestmark = pytest.mark.slow


def _torchrun(world: int, tmp_path: Path, name: str, restarts: int = 0, **worker_env: str):
    out = tmp_path / f"{name}.npz"
    env = dict(os.environ, **worker_env, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(WORKER.parents[2] / "lib"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", f"--max-restarts={restarts}", str(WORKER),
           str(tmp_path / f"{name}-shards"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(np.load(out))


def test_one_two_and_three_ranks_give_the_same_estimate_bit_for_bit(tmp_path):
    results = {w: _torchrun(w, tmp_path, f"w{w}") for w in (1, 2, 3)}
    assert results[1]["samples"].shape == (45,) and np.isfinite(results[1]["samples"]).all()
    for w in (2, 3):
        assert int(results[w]["world"]) == w
        for name in FIELDS:
            np.testing.assert_array_equal(results[w][name], results[1][name], err_msg=f"W={w} {name}")
    # each rank wrote its own shard
    assert sorted(p.name for p in (tmp_path / "w3-shards").iterdir()) == [
        "shard-0.npz", "shard-1.npz", "shard-2.npz"]


def test_a_killed_rank_is_restarted_and_loses_and_repeats_no_sample(tmp_path):
    reference = _torchrun(1, tmp_path, "reference")
    log = tmp_path / "log"
    log.mkdir()
    # rank 1 (blocks 1, 3, 5) dies after its 3rd batch; torchrun restarts both ranks once
    result = _torchrun(2, tmp_path, "killed", restarts=1, DIE_RANK="1", DIE_AFTER="3",
                       LOG_DIR=str(log))
    for name in FIELDS:
        np.testing.assert_array_equal(result[name], reference[name], err_msg=name)
    first = {r: json.loads((log / f"attempt0-rank{r}.json").read_text()) for r in (0, 1)}
    second = {r: json.loads((log / f"attempt1-rank{r}.json").read_text()) for r in (0, 1)}
    killed_done = set(first[1]["searched"])
    assert len(killed_done) >= 3 * 4 - 4  # three batches of 4 (the first may be the pilot)
    for r in (0, 1):
        on_start = set(second[r]["finished_at_start"])
        assert killed_done <= on_start  # every sample rank 1 finished before dying was kept
        again = set(second[r]["searched"]) & on_start
        assert not again, f"rank {r} searched finished samples again: {sorted(again)}"
