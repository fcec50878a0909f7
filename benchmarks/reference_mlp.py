"""Cost of localvol.estimate_log_volume_reference on Figure 1's digits MLP (N = 4,810), 2 CPU cores.

Needs the pipeline's trained MLP (`dvc repro train_mlp`). Runs the reference at Figure 1's
cutoff and prior from the Adam ν preconditioner (ε 1e-3, as Figure 1) and prints one table:
wall time, cost evaluations, evaluations per warm-started radius search inside moves,
temperatures, the run spread, the interval and the paper's estimator on the same directions.

    python benchmarks/reference_mlp.py [--particles 256] [--n-moves 8] [--pilots 2] [--moves langevin]
        [--kind hessian --eps 1e-2]
"""
from __future__ import annotations

import argparse
import time

import torch
import yaml

import localvol
from replication.mlp import curvature
from replication.mlp.data import load_split_data
from replication.mlp.model import load_trained


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=256)
    ap.add_argument("--n-moves", type=int, default=8)
    ap.add_argument("--pilots", type=int, default=2)
    ap.add_argument("--kind", default="adam_nu")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--moves", default="pcn", choices=["pcn", "langevin"])
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args()
    params = yaml.safe_load(open("params.yaml"))["estimate_figure1"]
    data = load_split_data("data/digits", "results/mlp/split.npz")
    model, optimizer_state = load_trained("results/mlp/model")
    model = model.double()  # the reference's rtol (~1e-5) needs a float64 KL
    x_held = torch.as_tensor(data["heldout_images"]).double()
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    vectors, _ = curvature.compute_curvature(
        curvature.needed_curvature({args.kind}), model, x_held, torch.as_tensor(data["train_images"]).double(),
        torch.as_tensor(data["train_labels"]), optimizer_state)
    pre = curvature.build_preconditioner(args.kind, args.eps, 0.5, vectors)
    cost = localvol.ExpectedKL(model, x_held)
    t0 = time.perf_counter()
    ref = localvol.estimate_log_volume_reference(
        cost, anchor, cutoff=params["cutoff"], prior=localvol.GaussianPrior(params["sigma"]),
        preconditioner=pre, n_particles=args.particles, n_moves=args.n_moves, n_pilots=args.pilots, moves=args.moves,
        n_runs=args.runs, progress=True)
    wall = time.perf_counter() - t0
    print("| N | preconditioner | M | moves | pilots | wall s | cost evals | evals/search (moves) | temperatures "
          "| spread (nats) | log10 volume | log10 95 % interval | paper log10 (same start) | converged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lo, hi = ref.log10_interval
    print(f"| {ref.n_params} | {args.kind} ε {args.eps:g} | {args.particles} | {args.moves} {args.n_moves} | {args.pilots} | "
          f"{wall:.0f} | {ref.cost_evaluations} | "
          f"{sum(r.move_evaluations_per_search for r in ref.runs) / len(ref.runs):.2f} | "
          f"{[r.n_temperatures for r in ref.runs]} | {ref.spread:.2f} | {ref.log10_volume:.1f} | "
          f"[{lo:.1f}, {hi:.1f}] | {ref.paper_log_volume / 2.302585092994046:.1f} | {ref.converged} |")
    for p in ref.problems:
        print("problem:", p)


if __name__ == "__main__":
    main()
