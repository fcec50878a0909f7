"""Radius-search speed: the paper's doubling bisection vs localvol's batched secant search.

Prints a table (not a timed test). For the same model, evaluation data, cutoff, rtol and
unit directions (``localvol.sample_directions``, same seed), it runs

* ``paper-bisect``: a plain re-implementation of the paper's ``find_radius_vectorized`` used
  with batch size 1 (docs/authors-code.md#radius-search): one direction per cost call,
  multiplier 1 (radius 1 in parameter units along the unit direction), doubled while the cost
  is below the cutoff, then bisected until |Δ − cutoff| ≤ rtol·cutoff, at most 100 iterations. It performs the calls
  the paper's code performed: the centre once per direction (batch of 1) and the first
  multiplier twice (the loop re-evaluates it). It returns the radius AT WHICH THE COST WAS
  EVALUATED (not the paper's off-by-one next guess, docs/authors-code.md#radius-search), so
  that its radii can be compared with ours.
* ``localvol``: :func:`localvol.estimate_log_volume` (several directions per forward pass,
  converged directions drop out, power-law/secant steps safeguarded by bisection).

Columns:
  evals/dir  cost evaluations per direction (median, mean). For paper-bisect: all calls the
             paper's code makes for that direction (centre + duplicate first point + search),
             with the search-only count (distinct points on the ray) in parentheses. For
             localvol: ``VolumeEstimate.evaluations`` (points on the ray; the anchor is
             evaluated once per run, not per direction).
  dirs/pass  directions per cost call (the search's batch).
  ms/sample  wall time of the whole search divided by the number of directions (direction
             sampling, centre/anchor evaluations included; model building and the anchor
             log-probabilities of ExpectedKL, shared by both methods, excluded).
  outside cost  share of that wall time spent outside the cost's calls (direction sampling,
             float64 reductions, point construction, the search's bookkeeping, the ray integral).
  |dr/r|     median (max) |r_ours − r_paper| / r_paper over the directions both methods ran.
  peak mem   CUDA: torch.cuda.max_memory_allocated during the phase; CPU: process max RSS
             so far (monotone, includes everything before).

Extra MLP rows (``--mlp-batch-sweep``) repeat localvol alone at other directions per pass.

Run:  python benchmarks/radius_search.py [--device auto|cpu|cuda] [--skip-lm] ...
The LM workload is 2 sequences of 128 random tokens; on 2 CPU cores the defaults (2 baseline
and 8 localvol directions, --mlp-samples 1000) take well under a minute.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import resource
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

import localvol
from localvol.estimator import default_batch_size

CUTOFF = 1e-2
RTOL = 1e-2
MLP_SIGMA = 1.3975424859373686  # params.yaml: 1/sqrt(l2 · n_train), as the paper's code
PYTHIA_31M_PARAMS = 30_494_720


# ---------------------------------------------------------------------------------------------
# Models and costs
# ---------------------------------------------------------------------------------------------


def build_digits_mlp(device, steps: int = 300, seed: int = 0):
    """64-64-10 GELU(tanh) MLP trained briefly on 1,024 digits; cost on the other 773."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(x)))
    train, test = perm[:1024], perm[1024:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[train]), y[train])
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(x[test]).argmax(-1) == y[test]).float().mean())
    model = model.to(device).eval()
    info = f"train loss {loss.item():.4f}, held-out accuracy {acc:.3f}, {len(test)} cost images"
    return model, x[test].to(device), info


def build_pythia_31m(device, n_seqs: int, seq_len: int, init_std: float, attn: str, seed: int = 0):
    """Pythia-31M-shaped GPT-NeoX with random weights and random token ids."""
    import transformers

    cfg = transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=1024, max_position_embeddings=2048, rotary_pct=0.25,
        rotary_emb_base=10000, use_parallel_residual=True, tie_word_embeddings=False,
        initializer_range=init_std,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(cfg).float()
    n = sum(p.numel() for p in model.parameters())
    assert n == PYTHIA_31M_PARAMS, n
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n_seqs, seq_len), generator=gen)
    model = model.to(device).eval()
    info = (f"random init (initializer_range {init_std}, seed {seed}), attention '{attn}', "
            f"{n_seqs}×{seq_len} random tokens")
    return model, ids.to(device), info


# ---------------------------------------------------------------------------------------------
# Baseline: the paper's doubling bisection, one direction at a time
# ---------------------------------------------------------------------------------------------


def paper_bisect(cost, anchor, direction, *, cutoff, rtol, init_mult=1.0, jump=2.0, max_iters=100):
    """Radius search of the paper's code for ONE unit direction (batch of 1).

    Returns (radius, delta, calls, search_points): the evaluated radius and its Δ, all cost
    calls made (centre + first point + loop, which re-evaluates the first point), and the
    number of distinct points on the ray. radius is NaN if max_iters ran out.
    """
    calls = 0

    def delta_at(m):
        nonlocal calls
        calls += 1
        with torch.no_grad():
            return float(cost(anchor[None] + m * direction[None])[0]) - center

    with torch.no_grad():
        center = float(cost(anchor[None])[0])  # the paper evaluates the centre once per batch
    calls += 1
    lo, hi, m = 0.0, math.inf, init_mult
    delta = delta_at(m)
    evaluated_m = m
    iters = 0
    while abs(delta - cutoff) > rtol * cutoff:
        if iters >= max_iters:
            return math.nan, delta, calls, calls - 2
        iters += 1
        delta = delta_at(m)  # the first pass re-evaluates init_mult
        evaluated_m = m
        if delta < cutoff:
            lo = m
        elif delta > cutoff:
            hi = m
        m = m * jump if math.isinf(hi) else 0.5 * (lo + hi)
    # The paper returns m (the next, unevaluated guess); we return the evaluated one.
    norm = float(torch.linalg.vector_norm(direction.double()))
    return evaluated_m * norm, delta, calls, calls - 2


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB gpu"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{kb / 2**20:.2f} GiB rss"


class CountingCost:
    """Wraps a batched cost: counts calls and (B, N) rows and the wall time spent inside it."""

    def __init__(self, cost, device):
        self.cost, self.device, self.calls, self.rows, self.seconds = cost, device, 0, 0, 0.0

    def __call__(self, theta):
        self.calls += 1
        self.rows += theta.shape[0]
        sync(self.device)
        t0 = time.perf_counter()
        out = self.cost(theta)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def run_pair(name, cost, anchor, prior, *, device, n_ours, n_base, dirs_per_pass, seed, warmup, log):
    """Runs baseline and ours on the same cost; returns table rows."""
    n = anchor.numel()
    rows = []
    fallback_msgs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if warmup:
            with torch.no_grad():
                cost(anchor[None])
                cost(anchor[None].expand(min(dirs_per_pass, n_ours), n).clone())
            sync(device)

        # --- baseline -------------------------------------------------------------------
        reset_peak(device)
        counted = CountingCost(cost, device)
        sync(device)
        t0 = time.perf_counter()
        base_r, base_calls, base_points = [], [], []
        for i in range(n_base):
            u = localvol.sample_directions(n, [i], seed=seed, dtype=anchor.dtype, device=anchor.device)[0]
            r, _, calls, points = paper_bisect(counted, anchor, u, cutoff=CUTOFF, rtol=RTOL)
            base_r.append(r)
            base_calls.append(calls)
            base_points.append(points)
            if n_base <= 20 or (i + 1) % 50 == 0:
                log(f"  [{name}] paper-bisect direction {i}: radius {r:.6g}, {calls} calls "
                    f"({points} points), {time.perf_counter() - t0:.1f} s so far")
        sync(device)
        t_base = time.perf_counter() - t0
        base_r = np.array(base_r)
        base_calls = np.array(base_calls)
        base_points = np.array(base_points)
        mem_base = peak_mem(device)

        # --- ours -----------------------------------------------------------------------
        reset_peak(device)
        counted_ours = CountingCost(cost, device)
        sync(device)
        t0 = time.perf_counter()
        est = localvol.estimate_log_volume(
            counted_ours, anchor, cutoff=CUTOFF, n_samples=n_ours, prior=prior, rtol=RTOL,
            batch_size=dirs_per_pass, seed=seed, progress=False,
        )
        sync(device)
        t_ours = time.perf_counter() - t0
        mem_ours = peak_mem(device)
        log(f"  [{name}] localvol: {n_ours} directions in {t_ours:.1f} s, "
            f"{counted_ours.calls} cost calls, radii median {np.median(est.radii):.6g}")
    for w in caught:
        msg = str(w.message)
        if "vmap" in msg or "batching rule" in msg:
            fallback_msgs.append(msg.split(". ")[0])

    k = min(n_ours, n_base)
    rel = np.abs(est.radii[:k] - base_r[:k]) / base_r[:k]
    rel_s = f"{np.nanmedian(rel):.2e} ({np.nanmax(rel):.2e})" if k else "n/a"
    ok_b = np.isfinite(base_r)
    rows.append({
        "model": name, "method": "paper-bisect", "k": n_base, "dirs/pass": 1,
        "evals/dir median": f"{np.median(base_calls):g} ({np.median(base_points):g})",
        "evals/dir mean": f"{base_calls.mean():.2f} ({base_points.mean():.2f})",
        "ms/sample": 1e3 * t_base / n_base, "|dr/r| med (max)": "ref", "peak mem": mem_base,
        "outside cost": f"{100 * (1 - counted.seconds / t_base):.0f} %",
        "unconverged": int((~ok_b).sum()),
    })
    ev = est.evaluations
    rows.append({
        "model": name, "method": "localvol", "k": n_ours, "dirs/pass": dirs_per_pass,
        "evals/dir median": f"{np.median(ev):g}",
        "evals/dir mean": f"{ev.mean():.2f} (+{(est.cost_evaluations - ev.sum()) / n_ours:.2f} anchor)",
        "ms/sample": 1e3 * t_ours / n_ours, "|dr/r| med (max)": rel_s, "peak mem": mem_ours,
        "outside cost": f"{100 * (1 - counted_ours.seconds / t_ours):.0f} %",
        "unconverged": int((~np.isfinite(est.radii)).sum()),
    })
    vmap_ok = getattr(cost, "_vmap_ok", None)
    notes = {
        "vmap over directions": {True: "used", False: "FAILED, fell back to one direction at a time",
                                 None: "n/a"}[vmap_ok],
        "torch vmap fallback warnings": sorted(set(fallback_msgs)) or "none",
        "median radius (paper-bisect / localvol)": f"{np.nanmedian(base_r):.6g} / {np.median(est.radii):.6g}",
        "speed-up in ms/sample": f"{(t_base / n_base) / (t_ours / n_ours):.2f}x",
        "radii agree within rtol (max |dr/r| <= rtol)": (
            "n/a" if k == 0 else ("yes" if np.nanmax(rel) <= RTOL else f"NO ({np.nanmax(rel):.3g} > {RTOL})")
        ),
    }
    return rows, notes


def localvol_row(name, cost, anchor, prior, *, device, n, batch, seed):
    """One localvol-only row at a given directions-per-pass (the batch-size sweep)."""
    counted = CountingCost(cost, device)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    est = localvol.estimate_log_volume(counted, anchor, cutoff=CUTOFF, n_samples=n, prior=prior,
                                       rtol=RTOL, batch_size=batch, seed=seed, progress=False)
    sync(device)
    t = time.perf_counter() - t0
    ev = est.evaluations
    return {
        "model": name, "method": "localvol", "k": n, "dirs/pass": batch,
        "evals/dir median": f"{np.median(ev):g}",
        "evals/dir mean": f"{ev.mean():.2f} (+{(est.cost_evaluations - ev.sum()) / n:.2f} anchor)",
        "ms/sample": 1e3 * t / n, "outside cost": f"{100 * (1 - counted.seconds / t):.0f} %",
        "|dr/r| med (max)": "", "peak mem": peak_mem(device), "unconverged": int((~np.isfinite(est.radii)).sum()),
    }


def format_table(rows):
    cols = ["model", "device", "method", "k", "dirs/pass", "evals/dir median", "evals/dir mean",
            "ms/sample", "outside cost", "|dr/r| med (max)", "unconverged", "peak mem"]

    def cell(r, c):
        v = r[c]
        if c == "ms/sample":
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(cell(r, c)) for r in rows)) for c in cols]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(cell(r, c).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0, help="direction seed (same for both methods)")
    p.add_argument("--skip-mlp", action="store_true")
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--mlp-samples", type=int, default=200, help="directions, each method")
    p.add_argument("--mlp-steps", type=int, default=300, help="Adam steps training the MLP")
    p.add_argument("--mlp-dirs-per-pass", type=int, default=None,
                   help="localvol batch_size for the MLP (default: the library's)")
    p.add_argument("--mlp-batch-sweep", default="16,32,128,256",
                   help="extra localvol-only rows for the MLP at these batch sizes ('' for none)")
    p.add_argument("--lm-samples", type=int, default=None,
                   help="localvol directions for the LM (default: 8 on CPU, 16 on CUDA)")
    p.add_argument("--lm-baseline-samples", type=int, default=None,
                   help="paper-bisect directions for the LM (default: 2 on CPU, 16 on CUDA)")
    p.add_argument("--lm-dirs-per-pass", type=int, default=None,
                   help="localvol directions per forward pass for the LM (default: 2 on CPU, 8 on CUDA)")
    p.add_argument("--lm-batch", type=int, default=2,
                   help="sequences per forward pass in ExpectedKL (memory ∝ dirs/pass × this × 547 × 50304)")
    p.add_argument("--lm-seqs", type=int, default=2)
    p.add_argument("--lm-seq-len", type=int, default=128)
    p.add_argument("--lm-init-std", type=float, default=0.02, help="GPTNeoXConfig.initializer_range")
    p.add_argument("--lm-attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    lm_ours = args.lm_samples or (16 if cuda else 8)
    lm_base = args.lm_baseline_samples or (16 if cuda else 2)
    lm_dpp = args.lm_dirs_per_pass or (8 if cuda else 2)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    hw = torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    header = [
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}, device {device} ({hw}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f}",
        f"cutoff {CUTOFF}, rtol {RTOL}, direction seed {args.seed}",
    ]
    rows, notes = [], []
    t_all = time.perf_counter()

    if not args.skip_mlp:
        log("MLP: training ...")
        model, x_eval, info = build_digits_mlp(device, steps=args.mlp_steps)
        anchor = parameters_to_vector(model.parameters()).detach()
        cost = localvol.ExpectedKL(model, x_eval)
        header.append(f"digits MLP 64-64-10, {anchor.numel()} params: {info}; GaussianPrior({MLP_SIGMA:.5g})")
        r, nt = run_pair(
            "digits MLP", cost, anchor, localvol.GaussianPrior(MLP_SIGMA), device=device,
            n_ours=args.mlp_samples, n_base=args.mlp_samples,
            dirs_per_pass=args.mlp_dirs_per_pass or default_batch_size(args.mlp_samples, anchor.numel()),
            seed=args.seed, warmup=True, log=log,
        )
        rows += r
        notes.append(("digits MLP", nt))
        for b in [int(x) for x in args.mlp_batch_sweep.split(",") if x]:
            rows.append(localvol_row("digits MLP", cost, anchor, localvol.GaussianPrior(MLP_SIGMA),
                                     device=device, n=args.mlp_samples, batch=b, seed=args.seed))
        del model, cost

    if not args.skip_lm:
        log("LM: building model and anchor log-probabilities ...")
        t0 = time.perf_counter()
        model, ids, info = build_pythia_31m(device, args.lm_seqs, args.lm_seq_len, args.lm_init_std, args.lm_attn)
        anchor = parameters_to_vector(model.parameters()).detach()
        cost = localvol.ExpectedKL(model, ids, batch_size=args.lm_batch)
        sync(device)
        t_setup = time.perf_counter() - t0
        header.append(
            f"Pythia-31M-shaped GPT-NeoX, {anchor.numel():,} params: {info}; ExpectedKL data batch "
            f"{args.lm_batch} seqs; setup (model + anchor log-probs) {t_setup:.1f} s, {peak_mem(device)}; "
            f"GaussianPrior({args.lm_init_std}) (only sets max_radius / log terms)"
        )
        if not cuda:
            header.append(
                f"LM on CPU: only {lm_base} paper-bisect and {lm_ours} localvol direction(s) "
                "(each cost evaluation is tens of seconds); ms/sample is indicative only"
            )
        r, nt = run_pair(
            "Pythia-31M (random)", cost, anchor, localvol.GaussianPrior(args.lm_init_std), device=device,
            n_ours=lm_ours, n_base=lm_base, dirs_per_pass=lm_dpp, seed=args.seed, warmup=True, log=log,
        )
        rows += r
        notes.append(("Pythia-31M (random)", nt))

    for r in rows:
        r["device"] = device.type
    print("\n".join(header))
    print()
    print(format_table(rows))
    print()
    for name, nt in notes:
        for key, val in nt.items():
            print(f"{name}: {key}: {val}")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s, load avg at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
