"""An estimate stage on several processes of this machine (params.yaml ``scale.processes``).

:func:`run_stage` is how an estimate notebook calls its stage function. With one process it is
a plain call. With P > 1 it first launches ``torchrun --standalone --nproc-per-node=P`` on this
module, whose ranks (one per GPU, ``cuda:LOCAL_RANK``, or CPU ranks with gloo) call the same
stage function with the same parameters: :func:`replication.sweep.run_sweep` deals the
(unit, block) pairs out to the ranks, each rank writes its own progress shards and stops with
:class:`~replication.sweep.ShardsDone`. Then the stage runs here, in the notebook's process:
every sample is already in the shards, so it only merges them (a missing one is an error) and
writes the stage's outputs. Blocks are computed the same way whoever computes them
(:class:`localvol.VolumeRun`), so the outputs are the same bit for bit for any number of ranks;
against one process (which searches with all cores) the cost's CPU kernels may round
differently, within float rounding. The ranks prepare each checkpoint with this process's
thread count (its σ, curvature and preconditioner scales key the shards, and must come out
alike) and search with one thread each (torchrun's OMP_NUM_THREADS).

A rank that fails ends the torchrun job (torchrun stops the others) and :func:`run_stage`
raises with its error; the shards finished so far stay, so a rerun resumes them.
"""
from __future__ import annotations

import codecs
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
    import torch

    with tempfile.TemporaryDirectory(prefix="localvol-ranks-") as tmp:
        spec = os.path.join(tmp, "stage.json")
        with open(spec, "w") as f:
            json.dump({"stage": f"{stage.__module__}:{stage.__qualname__}", "params": params,
                       "setup_threads": torch.get_num_threads()}, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", "-m", "replication.scale", spec]
        print(f"running the estimates on {processes} processes: {' '.join(cmd)}", flush=True)
        tail = collections.deque(maxlen=200)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while chunk := proc.stdout.read1(1 << 16):  # as it comes: progress bars keep their \r
                text = decoder.decode(chunk)
                sys.stdout.write(text)
                sys.stdout.flush()
                tail.extend(text.replace("\r", "\n").splitlines(keepends=True))
            proc.wait()
        except BaseException:  # an interrupted kernel must not leave ranks writing shards
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if proc.returncode != 0:
            lines = [line for line in tail if "local volume" not in line]  # errors, not bars
            raise RuntimeError(f"the {processes} estimate processes failed (exit code "
                               f"{proc.returncode}); the end of torchrun's output:\n"
                               + "".join(lines[-80:]))


def _worker(spec_path: str) -> None:
    """One rank: join the job, run the stage until its blocks are in the shards."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import record

    from localvol import distributed
    from replication.sweep import COMPUTE_THREADS, ShardsDone

    with open(spec_path) as f:
        spec = json.load(f)
    module, name = spec["stage"].split(":")
    stage = getattr(importlib.import_module(module), name)
    COMPUTE_THREADS.set(torch.get_num_threads())  # torchrun's OMP_NUM_THREADS share
    torch.set_num_threads(spec["setup_threads"])  # the merging process's, for the setup

    device = distributed.local_device()  # cuda:LOCAL_RANK: "cuda" in the stage means it
    if device.type == "cuda":
        torch.cuda.set_device(device)

    @record  # torchrun's error summary then shows the traceback
    def run() -> None:  # rank and world from torchrun's variables: no process group needed
        try:
            stage(**spec["params"])
        except ShardsDone:
            pass
        else:
            raise RuntimeError(f"{spec['stage']} finished without calling run_sweep")

    run()


if __name__ == "__main__":
    _worker(sys.argv[1])
