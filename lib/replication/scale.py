"""An estimate stage on several processes of this machine (params.yaml ``scale.processes``).

:func:`run_stage` is how an estimate notebook calls its stage function. With one process it is
a plain call. With P > 1 it first launches ``torchrun --standalone --nproc-per-node=P`` on this
module, whose ranks (one per GPU, ``cuda:LOCAL_RANK``, or CPU ranks with gloo) call the same
stage function with the same parameters: :func:`replication.sweep.run_sweep` deals the
(unit, block) pairs out to the ranks, each rank writes its own progress shards, and the ranks
stop with :class:`~replication.sweep.ShardsDone` at a barrier. Then the stage runs here, in
the notebook's process: every sample is already in the shards, so it only merges them and
writes the stage's outputs, which are the same bit for bit as with one process (blocks are
computed the same way whoever computes them: :class:`localvol.VolumeRun`).

A rank that fails ends the torchrun job (torchrun stops the others) and :func:`run_stage`
raises with its error; the shards finished so far stay, so a rerun resumes them.
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable

__all__ = ["run_stage", "check_processes"]


def check_processes(processes, key: str = "scale.processes") -> int:
    """``processes`` must be an integer ≥ 1; ValueError naming ``key`` otherwise."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"{key} must be an integer ≥ 1 (processes per machine), got {processes!r}")
    return processes


def run_stage(stage: Callable[..., Any], params: dict[str, Any], *,
              processes_key: str = "processes") -> Any:
    """``stage(**params)`` with its estimates computed by ``params[processes_key]`` processes.

    Args:
        stage: a module-level stage function (e.g. ``replication.pythia.estimate.figure4_stage``)
            whose parameters are JSON values; it must reach the estimates through
            :func:`replication.sweep.run_sweep`.
        params: the notebook's parameters; ``processes_key`` (default 1) is removed from them.

    Returns:
        What ``stage`` returns. Raises ValueError for a bad process count, RuntimeError with
        the end of torchrun's output when a rank fails, and RuntimeError when the merge finds
        samples missing from the shards (this process and the ranks disagree on a unit).
    """
    from replication.sweep import MERGE_ONLY

    params = dict(params)
    processes = check_processes(params.pop(processes_key, 1))
    if processes == 1:
        return stage(**params)
    _launch(stage, params, processes)
    token = MERGE_ONLY.set(True)  # every sample is in the shards: merge, compute nothing
    try:
        return stage(**params)
    finally:
        MERGE_ONLY.reset(token)


def _launch(stage, params: dict, processes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="localvol-ranks-") as tmp:
        spec = os.path.join(tmp, "stage.json")
        with open(spec, "w") as f:
            json.dump({"stage": f"{stage.__module__}:{stage.__qualname__}", "params": params}, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "-m", "replication.scale", spec]
        print(f"running the estimates on {processes} processes: {' '.join(cmd)}", flush=True)
        tail = collections.deque(maxlen=80)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1) as proc:
            for line in proc.stdout:  # shown as it comes (progress), the end kept for errors
                sys.stdout.write(line)
                tail.append(line)
        if proc.returncode != 0:
            raise RuntimeError(f"the {processes} estimate processes failed (exit code "
                               f"{proc.returncode}); the end of torchrun's output:\n"
                               + "".join(tail))


def _worker(spec_path: str) -> None:
    """One rank: join the job, run the stage until its blocks are in the shards."""
    import torch.distributed as dist

    from localvol import distributed
    from replication.sweep import ShardsDone

    with open(spec_path) as f:
        spec = json.load(f)
    module, name = spec["stage"].split(":")
    stage = getattr(importlib.import_module(module), name)
    distributed.init()
    try:
        stage(**spec["params"])
    except ShardsDone:
        pass
    else:
        raise RuntimeError(f"{spec['stage']} finished without reaching run_sweep's barrier")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
