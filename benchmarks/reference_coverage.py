"""Coverage of localvol.estimate_log_volume_reference on bodies of known volume.

Per body and N: the truth (closed form), the paper's estimator at k = 1,000 (naive and with a
misspecified diagonal preconditioner), the reference started from the misspecified
preconditioner, each error in nats, the reference's 95 % interval, how often it covers the truth
over seeds, and cost evaluations. Prints a Markdown table.

    python benchmarks/reference_coverage.py                       # N = 10, 100; 20 seeds
    python benchmarks/reference_coverage.py --n 1000 --seeds 5    # larger bodies, fewer seeds

Bodies: benchmarks/bodies.py (each cost is the body's gauge about the anchor, so the star domain
{C < 1} is the body; truths from closed forms or, for the Gaussian measure of ellipsoids, from
the exact inversion integral of benchmarks/gaussian_ellipsoid.py).
Misspecified preconditioner: diag with exponent 1/4 of the true per-axis curvature a_j^-2 times
log-normal noise (sd 0.5): half-matched in log scale, with errors.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from localvol import DiagonalPreconditioner, estimate_log_volume
from localvol.reference import estimate_log_volume_reference

from bodies import BODIES, DT, make


def misspecified(curvature, rng):
    noisy = curvature * np.exp(0.5 * rng.standard_normal(len(curvature)))
    return DiagonalPreconditioner(torch.as_tensor(noisy, dtype=DT), eps=0.0, exponent=0.25)


def one(body, n, seed, k, reference_kwargs):
    cost, anchor, prior, truth, curvature, rng = make(body, n, seed)
    pre = misspecified(curvature, rng)
    kw = dict(cutoff=1.0, prior=prior, progress=False, seed=seed)
    naive = estimate_log_volume(cost, anchor, n_samples=k, rtol=1e-3, **kw)
    diag = estimate_log_volume(cost, anchor, n_samples=k, rtol=1e-3, preconditioner=pre, **kw)
    t0 = time.perf_counter()
    ref = estimate_log_volume_reference(cost, anchor, preconditioner=pre, **kw, **reference_kwargs)
    return dict(truth=truth, naive=naive.log_volume - truth, diag=diag.log_volume - truth,
                ref=ref.log_volume - truth, lo=ref.interval[0] - truth, hi=ref.interval[1] - truth,
                covered=ref.interval[0] <= truth <= ref.interval[1], converged=ref.converged,
                evaluations=ref.cost_evaluations, seconds=time.perf_counter() - t0,
                per_search=float(np.mean([r.move_evaluations_per_search for r in ref.runs])),
                moves=float(np.mean([r.moves.mean() for r in ref.runs])),
                kappa=float(np.median(np.concatenate([r.kappas for r in ref.runs]))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--bodies", nargs="+", default=list(BODIES))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--particles", type=int, default=256)
    ap.add_argument("--moves", type=int, default=8, help="n_moves: pCN moves per step at least")
    ap.add_argument("--max-moves", type=int, default=None, help="max_moves (default 4 n_moves)")
    ap.add_argument("--kernel", default="pcn", choices=["pcn", "langevin"], help="the reference's moves")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kwargs = dict(n_particles=args.particles, n_moves=args.moves)
    if args.kernel != "pcn":
        kwargs["moves"] = args.kernel
    if args.max_moves is not None:
        kwargs["max_moves"] = args.max_moves
    print(f"reference: {kwargs}, 4 runs, 2 pilots, rtol 0.05/N; paper estimator k = {args.k}; errors in nats "
          f"(estimate − truth); {args.seeds} seeds per row")
    print("| body | N | truth | paper naive | paper mis-diag | reference (median) | |err| median | 95 % interval (median) "
          "| coverage | converged | evaluations | evals/search | moves/step | κ | s/estimate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for body in args.bodies:
            rows = [one(body, n, seed, args.k, kwargs) for seed in range(args.seeds)]
            med = {key: float(np.median([r[key] for r in rows])) for key in rows[0] if key not in ("covered", "converged")}
            cover = np.mean([r["covered"] for r in rows])
            conv = np.mean([r["converged"] for r in rows])
            abs_err = float(np.median([abs(r["ref"]) for r in rows]))
            print(f"| {body} | {n} | {med['truth']:.1f} | {med['naive']:.1f} | {med['diag']:.1f} | {med['ref']:+.2f} | "
                  f"{abs_err:.2f} | [{med['lo']:+.2f}, {med['hi']:+.2f}] | {cover:.0%} | {conv:.0%} | "
                  f"{med['evaluations']:.0f} | {med['per_search']:.2f} | {med['moves']:.1f} | {med['kappa']:.2f} | "
                  f"{med['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
