"""One estimate spread over the ranks of a ``torch.distributed`` job (``torchrun``).

Every sample is independent (direction i depends only on (seed, i)), and :class:`VolumeRun`
computes each block of samples the same way whoever computes it, so the blocks are dealt out
to the ranks (block b to rank b mod W) and the merged estimate is the same, bit for bit, for
any number of ranks W (on one device type, with the same threads per process). Each rank writes
its own progress file, ``shard-{rank}.npz`` in ``shard_dir``, after every batch; a rank killed
and restarted (``torchrun --max-restarts``, or a plain rerun with any W) resumes from every
shard in the folder, so no finished sample is lost, and only the at most 16 pilot directions
(which every rank needs) are searched again by a rank that does not hold them. Shards written
with other settings, another cost or another version of localvol are refused (ValueError), never
merged. The ranks exchange no tensors and call no collective: a rank that has finished its
blocks reads the shards every few seconds until every sample is in them, then returns the whole
estimate (so a slow rank never trips a collective's timeout).

Launch (one process per GPU; CPU ranks when CUDA is absent)::

    torchrun --standalone --nproc-per-node=8 my_estimate.py
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 my_estimate.py

where ``my_estimate.py`` calls :func:`init` and :func:`estimate_log_volume_distributed`
(README.md, "Many processes"). A rank that fails ends the job: torchrun stops the other ranks
(waiting for its shards) and reports the failing rank's error.
"""
from __future__ import annotations

import os
import re
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from .estimator import BLOCK_SIZE, VolumeEstimate, VolumeRun

__all__ = ["init", "rank_and_world", "local_device", "shard_paths", "wait_for_shards",
           "estimate_log_volume_distributed"]

_SHARD = re.compile(r"shard-(\d+)\.npz")


def init(timeout_s: float = 1800.0) -> torch.device:
    """Join the job torchrun launched (its RANK, WORLD_SIZE, MASTER_ADDR... variables) with the
    gloo backend and return this rank's device: ``cuda:LOCAL_RANK`` (modulo the GPUs present)
    when CUDA is present, else the CPU. The estimate exchanges nothing through the process
    group, so gloo serves GPUs too, and several ranks may share one GPU (NCCL refuses that). Without those
    variables (a plain ``python`` run) nothing is initialised: one rank. ``timeout_s``: how
    long a collective of the user's own would wait (the estimate calls none)."""
    device = local_device()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(rendezvous("env://", timeout=timeout))
        # torchrun keeps its store across restarts: keys of the failed attempt (its ranks'
        # addresses) would be read back, so each attempt works under its own prefix
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("gloo", store=dist.PrefixStore(f"localvol/attempt{attempt}/", store),
                                rank=rank, world_size=world, timeout=timeout)
    return device


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size): in ``group`` (default: the whole job) when torch.distributed is
    initialised, else from torchrun's RANK and WORLD_SIZE variables, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (LOCAL_RANK from torchrun, default 0) when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def shard_paths(shard_dir) -> list[Path]:
    """The progress files ``shard-{rank}.npz`` in ``shard_dir`` (not temporary files)."""
    folder = Path(shard_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SHARD.fullmatch(p.name))


def wait_for_shards(run: VolumeRun, shard_dir, *, poll_s: float = 2.0,
                    timeout_s: float | None = None) -> None:
    """Load the shards of ``shard_dir`` into ``run`` every ``poll_s`` seconds until every
    sample is done. A shard that cannot be loaded is retried at the next poll; the third
    failure in a row raises its ValueError (a shard of other settings, say). Raises TimeoutError after ``timeout_s`` (None: wait as long as the job lives; torchrun
    stops the ranks when one fails)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failures: dict[Path, int] = {}
    while True:
        for path in shard_paths(shard_dir):
            try:
                run.load(path)
                failures.pop(path, None)
            except ValueError:  # caught mid-replacement (a network file system), or foreign
                failures[path] = failures.get(path, 0) + 1
                if failures[path] >= 3:
                    raise
        if run.done.all():
            return
        if deadline is not None and time.monotonic() > deadline:
            missing = int((~run.done).sum())
            raise TimeoutError(f"{missing} samples still missing from the shards of {shard_dir} "
                               f"after {timeout_s} s")
        time.sleep(poll_s)


def estimate_log_volume_distributed(cost, anchor: torch.Tensor, *, shard_dir, cutoff: float,
                                    n_samples: int, prior, preconditioner=None,
                                    rtol: float = 1e-2, batch_size: int | None = None,
                                    seed: int = 0, progress: bool = True,
                                    max_radius: float | None = None,
                                    block_size: int = BLOCK_SIZE, group=None,
                                    timeout_s: float | None = None) -> VolumeEstimate:
    """:func:`localvol.estimate_log_volume` with its blocks spread over the ranks of the job.

    Every rank calls it with the same arguments (its own copy of the cost and anchor, on its
    device). Rank r computes blocks r, r + W, ... (blocks of ``block_size`` samples; block 0's
    first batch, the pilot, guides every block, so a rank without block 0 also searches those
    at most 16 directions), saving ``shard_dir/shard-{r}.npz`` after every batch; then it
    waits until the shards hold every sample (:func:`wait_for_shards`) and returns the merged
    estimate.

    Args:
        shard_dir: folder for the shards, on a file system every rank sees (one folder per
            estimate; delete it once the result is kept). Shards already there are resumed.
        group: the process group giving rank and world size (default: the whole job, or
            torchrun's RANK and WORLD_SIZE; neither: one process).
        timeout_s: how long a finished rank waits for the others' shards (None: no limit).
        Others: as :func:`localvol.estimate_log_volume` (``progress``: rank 0's bar only).

    Returns:
        The same :class:`~localvol.VolumeEstimate` on every rank, equal bit for bit to a
        single-process run with the same ``block_size`` (``wall_time_s`` aside) when every
        process runs on the same device type with the same number of threads.

    Raises:
        ValueError: as :func:`localvol.estimate_log_volume`; a shard of other settings, cost or
            code (delete ``shard_dir`` to start afresh). TimeoutError: see ``timeout_s``.
    """
    rank, world = rank_and_world(group)
    run = VolumeRun(cost, anchor, cutoff=cutoff, n_samples=n_samples, prior=prior,
                    preconditioner=preconditioner, rtol=rtol, batch_size=batch_size, seed=seed,
                    max_radius=max_radius, block_size=block_size, resumable=True)
    for path in shard_paths(shard_dir):
        run.load(path)
    run.run(range(rank, run.n_blocks, world), save_to=Path(shard_dir) / f"shard-{rank}.npz",
            progress=progress and rank == 0)
    wait_for_shards(run, shard_dir, timeout_s=timeout_s)
    return run.result()
