"""Coverage of localvol.estimate_log_volume_reference on bodies of known volume.

Per body and N: the truth (closed form), the paper's estimator at k = 1,000 (naive and with a
misspecified diagonal preconditioner), the reference started from the misspecified
preconditioner, each error in nats, the reference's 95 % interval, how often it covers the truth
over seeds, and cost evaluations. Prints a Markdown table.

    python benchmarks/reference_coverage.py                       # N = 10, 100; 20 seeds
    python benchmarks/reference_coverage.py --n 1000 --seeds 5    # larger bodies, fewer seeds

Bodies (every cost is the body's gauge about the anchor, or a power of it, so the star domain
{C < 1} is the body; the anchor is inside, shifted from the centre where named):
  ellipsoid        Lebesgue, semi-axes exp(g), g ~ N(0, 1): V_N ∏ a_j
  ellipsoid-shift  the same, anchor moved to 0.5 of the way to the boundary along a random ray
  l1, l4, l0.5     Lebesgue l_p balls with log-normal per-axis scales: ∏ 2 a_j Γ(1+1/p) / Γ(1+N/p)
                   (p = 0.5 is not convex: a star body about its centre)
  box-gauss        Gaussian N(0, I) mass of an anisotropic box, centre shifted: ∏ [Φ(u_j) − Φ(l_j)]
  cross            Lebesgue union of two boxes sharing their centre, long in complementary halves
                   of the axes (not convex): V1 + V2 − V(B1 ∩ B2)
Misspecified preconditioner: diag with exponent 1/4 of the true per-axis curvature a_j^-2 times
log-normal noise (sd 0.5): half-matched in log scale, with errors.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.special import gammaln, log_ndtr, logsumexp

from localvol import DiagonalPreconditioner, GaussianPrior, LebesguePrior, estimate_log_volume
from localvol.reference import estimate_log_volume_reference

DT = torch.float64


def _scales(n, rng, sd=1.0):
    return np.exp(sd * rng.standard_normal(n))


def ellipsoid(n, rng, shift=False):
    a = _scales(n, rng)
    centre = np.zeros(n)
    anchor = centre.copy()
    if shift:
        d = rng.standard_normal(n)
        d /= np.sqrt(np.sum((d / a) ** 2))  # on the boundary
        anchor = centre + 0.5 * d
    A, C, Q = (torch.as_tensor(x, dtype=DT) for x in (a, centre, anchor))

    def cost(theta):  # gauge of the ellipsoid about the anchor: 1/t*, a + t*(x − a) on the boundary
        d = theta - Q
        qa = ((d / A) ** 2).sum(-1)
        qb = 2 * (((Q - C) * d) / A**2).sum(-1)
        qc = (((Q - C) / A) ** 2).sum() - 1.0
        t = (-qb + torch.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
        return torch.where(qa > 0, 1.0 / t, torch.zeros_like(qa))

    truth = 0.5 * n * math.log(math.pi) - gammaln(0.5 * n + 1) + float(np.log(a).sum())
    return cost, anchor, LebesguePrior(), truth, a**-2


def lp_ball(n, rng, p):
    a = _scales(n, rng)
    A = torch.as_tensor(a, dtype=DT)

    def cost(theta):  # Σ|x/a|^p: homogeneous of degree p along rays from the centre
        return ((theta / A).abs() ** p).sum(-1)

    truth = n * math.log(2) + float(np.log(a).sum()) + n * gammaln(1 + 1 / p) - gammaln(1 + n / p)
    return cost, np.zeros(n), LebesguePrior(), truth, a**-2


def box_gauss(n, rng):
    h = 0.5 * _scales(n, rng, 0.7)  # half-widths in prior sd units
    centre = 0.3 * h * rng.uniform(-1, 1, n)
    anchor = centre + 0.3 * h * rng.uniform(-1, 1, n)
    H, C, Q = (torch.as_tensor(x, dtype=DT) for x in (h, centre, anchor))
    up, down = C + H - Q, Q - (C - H)

    def cost(theta):  # the box's gauge about the anchor
        d = theta - Q
        return (d.clamp(min=0) / up + (-d).clamp(min=0) / down).amax(-1)

    upper, lower = (centre + h), (centre - h)
    # log(Φ(u) − Φ(l)) stably, on the side of the origin's tail
    truth = float(np.sum(np.logaddexp(log_ndtr(upper), -np.inf) + np.log(-np.expm1(log_ndtr(lower) - log_ndtr(upper)))))
    return cost, anchor, GaussianPrior(1.0), truth, h**-2


def cross(n, rng):
    h = _scales(n, rng, 0.5)
    half = n // 2
    h1, h2 = h.copy(), h.copy()
    h1[:half] *= 3.0
    h2[half:] *= 3.0
    H1, H2 = torch.as_tensor(h1, dtype=DT), torch.as_tensor(h2, dtype=DT)

    def cost(theta):  # min of the two boxes' gauges: {C < 1} is their union
        return torch.minimum((theta.abs() / H1).amax(-1), (theta.abs() / H2).amax(-1))

    log_v1, log_v2, log_v12 = (float(np.sum(np.log(2 * x))) for x in (h1, h2, np.minimum(h1, h2)))
    truth = float(logsumexp([log_v1, log_v2, log_v12], b=[1, 1, -1]))
    return cost, np.zeros(n), LebesguePrior(), truth, np.minimum(h1, h2) ** -2


BODIES = {
    "ellipsoid": lambda n, rng: ellipsoid(n, rng),
    "ellipsoid-shift": lambda n, rng: ellipsoid(n, rng, shift=True),
    "l1": lambda n, rng: lp_ball(n, rng, 1.0),
    "l4": lambda n, rng: lp_ball(n, rng, 4.0),
    "l0.5": lambda n, rng: lp_ball(n, rng, 0.5),
    "box-gauss": box_gauss,
    "cross": cross,
}


def misspecified(curvature, rng):
    noisy = curvature * np.exp(0.5 * rng.standard_normal(len(curvature)))
    return DiagonalPreconditioner(torch.as_tensor(noisy, dtype=DT), eps=0.0, exponent=0.25)


def one(body, n, seed, k, reference_kwargs):
    rng = np.random.default_rng([seed, n, sum(map(ord, body))])
    cost, anchor, prior, truth, curvature = BODIES[body](n, rng)
    anchor = torch.as_tensor(anchor, dtype=DT)
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
    args = ap.parse_args()
    torch.set_num_threads(1)
    kwargs = dict(n_particles=args.particles, n_moves=args.moves)
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
