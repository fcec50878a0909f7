"""One sharded estimate of a tiny MLP's local volume, run by test_distributed.py under
``torchrun`` (CPU, gloo). Rank 0 writes the merged estimate to OUT (.npz).

Environment (torchrun would take options after the script for its own): DIE_RANK=R and
DIE_AFTER=B: rank R exits abruptly (os._exit, as a killed process would) after its B-th batch,
on the first attempt only (TORCHELASTIC_RESTART_COUNT 0). LOG_DIR=DIR: each rank writes, per
attempt, the samples it found finished on starting and the ones it searched.
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

import localvol as lv
from localvol import distributed
from localvol.estimator import VolumeRun


def tiny_mlp_cost():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    inputs = torch.randn(32, 6, generator=g)
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return lv.ExpectedKL(model, inputs), anchor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shard_dir")
    parser.add_argument("out")
    args = parser.parse_args()
    args.die_rank = int(os.environ.get("DIE_RANK", -1))
    args.die_after = int(os.environ.get("DIE_AFTER", 0))
    args.log = os.environ.get("LOG_DIR", "")
    torch.set_num_threads(1)  # the same float operations in every rank, whatever W
    distributed.init(timeout_s=120)
    rank, world = distributed.rank_and_world()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    searched, batches = [], [0]
    search, run = VolumeRun._search, VolumeRun.run

    def logged_search(self, idx, guide):
        search(self, idx, guide)
        searched.extend(int(i) for i in idx)

    def logged_run(self, blocks=None, **kw):
        if args.log:
            log = Path(args.log) / f"attempt{attempt}-rank{rank}.json"
            log.write_text(json.dumps({"finished_at_start": np.flatnonzero(self.done).tolist(),
                                       "searched": []}))
        return run(self, blocks, **kw)

    def save(self, path):  # after each batch: log, then die where asked
        VolumeRun._save_original(self, path)
        if args.log:
            log = Path(args.log) / f"attempt{attempt}-rank{rank}.json"
            record = json.loads(log.read_text())
            record["searched"] = searched
            log.write_text(json.dumps(record))
        batches[0] += 1
        if attempt == 0 and rank == args.die_rank and batches[0] == args.die_after:
            os._exit(3)

    VolumeRun._search, VolumeRun.run = logged_search, logged_run
    VolumeRun._save_original, VolumeRun._save = VolumeRun._save, save

    cost, anchor = tiny_mlp_cost()
    est = distributed.estimate_log_volume_distributed(
        cost, anchor, shard_dir=args.shard_dir, cutoff=0.05, n_samples=45, prior=lv.GaussianPrior(1.0),
        preconditioner=lv.DiagonalPreconditioner(torch.linspace(0.5, 2.0, anchor.numel()), eps=0.0),
        rtol=5e-2, batch_size=4, seed=5, block_size=8, progress=False)
    if rank == 0:
        np.savez(args.out, samples=est.samples, radii=est.radii, evaluations=est.evaluations,
                 cost_at_radius=est.cost_at_radius, direction_norms=est.direction_norms,
                 log_volume=est.log_volume, cost_evaluations=est.cost_evaluations, world=world)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
