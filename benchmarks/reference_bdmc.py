"""Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015) on centred ellipsoids: the
reference estimator's answer sandwiched between a forward and a reverse run.

Where exact samples of the final target τ_1 exist, annealed importance sampling run backwards
(β from 1 to 0, started from exact samples) gives an unbiased estimate of 1/μ(S), so the log of
its average is a stochastic UPPER bound on log μ(S); the forward run (the reference, or forward
AIS) is a stochastic lower bound. The gap between the two bounds bounds the forward error on
these bodies without using the truth; the truth is printed too.

For the ellipsoid Σ(x_j/a_j)² < 1 under the Lebesgue measure and a diagonal preconditioner p,
the latent image of the body is the ellipsoid of semi-axes a_j/p_j, and τ_1 is the direction of
a uniform point in it: the angular central Gaussian of diag((a/p)²), sampled exactly as y/|y|,
y ~ N(0, diag((a/p)²)).

    python benchmarks/reference_bdmc.py                 # N = 10, 100, 1000; 3 seeds
    python benchmarks/reference_bdmc.py --n 100 --seeds 5 --steps 400

Both AIS directions use the library's own move (localvol.reference._Sampler.move, the lifted pCN
kernel) with the exact target's shape held fixed (a valid kernel at every β), the same
schedule β_t = (t/T)^4 and the same moves per step; the reference is run as a user calls it.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.special import gammaln, logsumexp

from localvol import DiagonalPreconditioner, LebesguePrior, estimate_log_volume_reference
from localvol.estimator import VolumeRun, default_batch_size
from localvol.reference import TARGET_ACCEPTANCE, _Sampler, default_reference_rtol

DT = torch.float64


def body(n, seed):
    rng = np.random.default_rng([seed, n, 7])
    a = np.exp(rng.standard_normal(n))
    A = torch.as_tensor(a, dtype=DT)

    def cost(theta):  # the ellipsoid's gauge about its centre
        return torch.sqrt(((theta / A) ** 2).sum(-1))

    truth = 0.5 * n * math.log(math.pi) - gammaln(0.5 * n + 1) + float(np.log(a).sum())
    curvature = a**-2 * np.exp(0.5 * rng.standard_normal(n))  # misspecified, as in reference_coverage
    pre = DiagonalPreconditioner(torch.as_tensor(curvature, dtype=DT), eps=0.0, exponent=0.25)
    return cost, truth, pre, a


def ais(smc, shape, betas, n_moves, z, seed, reverse):
    """Log-mean-exp of the AIS weights along betas (forward: from uniform directions z; reverse:
    from exact τ_1 draws z, betas descending). Returns (log estimate, evaluations)."""
    rng = np.random.default_rng([seed, int(reverse)])
    gen = torch.Generator().manual_seed(seed * 2 + int(reverse))
    logw, radius, evals, exponent = smc.weights(z, None)
    total = int(evals.sum())
    log_weight = np.zeros(len(z))
    s = 0.5
    for t in range(1, len(betas)):
        log_weight += (betas[t] - betas[t - 1]) * logw
        for _ in range(n_moves):
            z, logw, radius, exponent, acc, e = smc.move(z, logw, radius, exponent, betas[t], shape, s, gen, rng)
            total += int(e.sum())
            s = float(np.clip(s * math.exp(acc - TARGET_ACCEPTANCE), 1e-4, 1.0))
    return float(logsumexp(log_weight) - math.log(len(z))), total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--particles", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--moves", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"AIS: {args.particles} particles, {args.steps} steps β = (t/T)^4, {args.moves} moves per step, "
          "the exact target's shape; the reference at its defaults. Nats, relative to the truth.")
    print("| N | seed | truth | forward AIS (lower) | reverse AIS (upper) | gap | reference | reference 95 % interval "
          "| reference inside [forward, reverse] ± its interval | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            cost, truth, pre, a = body(n, seed)
            anchor = torch.zeros(n, dtype=DT)
            M = args.particles
            base = VolumeRun(cost, anchor, cutoff=1.0, n_samples=1, prior=LebesguePrior(), preconditioner=pre,
                             rtol=default_reference_rtol(n), batch_size=default_batch_size(M, n), seed=seed,
                             max_radius=None)
            smc = _Sampler(base, M, (1, 1), 0.8, 1, default_batch_size(M, n), seed)
            latent_sd = a / pre.scales.double().numpy()  # semi-axes of the body's latent image
            c = latent_sd**2 / np.exp(2 * np.log(latent_sd).mean())
            shape = (1.0, c)
            betas = (np.arange(args.steps + 1) / args.steps) ** 4
            g = torch.Generator().manual_seed(10_000 + seed)
            u0 = torch.randn(M, n, generator=g, dtype=DT)
            u0 /= torch.linalg.vector_norm(u0, dim=1, keepdim=True)
            y = torch.randn(M, n, generator=g, dtype=DT) * torch.as_tensor(latent_sd)
            u1 = y / torch.linalg.vector_norm(y, dim=1, keepdim=True)
            fwd, _ = ais(smc, shape, betas, args.moves, u0, seed, reverse=False)
            rev_inv, _ = ais(smc, shape, betas[::-1].copy(), args.moves, u1, seed, reverse=True)
            rev = -rev_inv  # log of an unbiased estimate of 1/μ: its negative is an upper bound
            ref = estimate_log_volume_reference(cost, anchor, cutoff=1.0, prior=LebesguePrior(), preconditioner=pre,
                                                seed=seed, progress=False)
            lo, hi = ref.interval
            inside = (lo <= rev) and (hi >= fwd)
            print(f"| {n} | {seed} | {truth:.1f} | {fwd - truth:+.3f} | {rev - truth:+.3f} | {rev - fwd:.3f} | "
                  f"{ref.log_volume - truth:+.3f} | [{lo - truth:+.3f}, {hi - truth:+.3f}] | "
                  f"{'yes' if inside else 'NO'} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
