"""The local-volume estimator: paper §3, eq. 10 (naive), 15 (preconditioned), 19 (Gaussian).

    log vol ≈ logsumexp_i(log w_i) − log k,
    log w_i = log|S^(N−1)| + log ∫_0^{r(v̂_i)} ρ(θ0 + t v̂_i) t^(N−1) dt − N log|v_i|   (eq. 19)

with u_i uniform on the unit sphere, v_i = P u_i, and r(v̂_i) the radius at which the cost
crosses the cutoff (:func:`localvol.radius.find_radius`). For the Lebesgue measure the ray
integral is r^N / N (eq. 15). The estimate is unbiased for the mass; its log is a
high-probability lower bound (Markov, eq. 14).
"""
from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp
from tqdm import tqdm

from ._reduce import checksum64, row_dot64, row_dots64
from .code_version import source_hash
from .preconditioners import PaperMatrixPreconditioner
from .priors import GaussianPrior, LebesguePrior
from .radius import _check_search_args, evaluate_anchor_cost, find_radius

__all__ = ["VolumeEstimate", "estimate_log_volume", "sample_directions", "direction_seed", "default_batch_size"]

LN10 = math.log(10.0)


@dataclass
class VolumeEstimate:
    """Result of :func:`estimate_log_volume`. Logs are natural (nats) unless named log10.

    Attributes:
        log_volume: logsumexp(samples) − log k, nats: the log prior mass (or log volume) of
            the neighbourhood.
        samples: (k,) float64 per-sample log terms log w_i, nats (eq. 15 / 19).
        radii: (k,) float64 Euclidean radii along v̂_i, parameter units (inf: unbounded).
        cost_at_radius: (k,) float64, C(θ0 + r_i v̂_i) − C(θ0) as evaluated at each radius.
        direction_norms: (k,) float64 |v_i| = |P u_i| / |u_i| (1 for naive).
        evaluations: (k,) int64 cost evaluations spent per direction.
        cost_evaluations: total points at which the cost was evaluated, anchor included.
        log_prior_at_anchor: −|θ0/σ|²/2 = log ρ(θ0) − log ρ(0), nats (Gaussian prior only,
            else None): the "prior term" (docs/method.md#prior-and-neighbourhood-terms).
        preconditioner_is_identity: True for the naive estimator and for a preconditioner
            whose scales are all 1 (e.g. Adam ν of an optimizer that never stepped): the
            estimate is then the naive one, whatever its label says.
        n_unbounded: directions along which the cost stayed below the cutoff up to max_radius
            (radius inf; the whole ray counts).
    """

    log_volume: float
    samples: np.ndarray
    radii: np.ndarray
    cost_at_radius: np.ndarray
    direction_norms: np.ndarray
    evaluations: np.ndarray
    cost_evaluations: int
    log_prior_at_anchor: float | None
    n_params: int
    cutoff: float
    rtol: float
    seed: int
    prior: str
    preconditioner: str
    preconditioner_is_identity: bool = True
    n_unbounded: int = 0
    wall_time_s: float = 0.0
    meta: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        lp = "" if self.log_prior_at_anchor is None else f", log_prior_at_anchor={self.log_prior_at_anchor:.6g}"
        return (
            f"VolumeEstimate(log_volume={self.log_volume:.6g} nats (log10 {self.log10_volume:.6g}), "
            f"k={self.n_samples}, n_params={self.n_params}, cutoff={self.cutoff:g}{lp}, "
            f"prior={self.prior}, preconditioner={self.preconditioner}, "
            f"cost_evaluations={self.cost_evaluations}, max_sample_share={self.max_sample_share:.3g})"
        )

    @property
    def n_samples(self) -> int:
        return int(self.samples.size)

    @property
    def log10_volume(self) -> float:
        """log_volume / ln 10 (base-10 log of the probability, as the paper's figures plot)."""
        return self.log_volume / LN10

    @property
    def log_neighbourhood(self) -> float | None:
        """log_volume − log_prior_at_anchor, nats: what the neighbourhood adds to the prior term."""
        if self.log_prior_at_anchor is None:
            return None
        return self.log_volume - self.log_prior_at_anchor

    @property
    def max_sample_share(self) -> float:
        """Share of the largest sample in the sum exp(samples): 1 means one sample decides all."""
        if not np.isfinite(self.log_volume):
            return float("nan")
        return float(np.exp(self.samples.max() - logsumexp(self.samples)))

    @property
    def markov(self) -> str:
        """The Markov statement of eq. 14 for this k."""
        k = self.n_samples
        return (
            f"P(log_volume − true log volume ≥ log k = {math.log(k):.4g} nats) ≤ 1/k = {1 / k:.3g} "
            f"(Markov, eq. 14); the largest of the k = {k} samples holds {self.max_sample_share:.3g} of the sum"
        )

    def to_dict(self) -> dict:
        """JSON-serialisable aggregates (no per-sample arrays, no wall time): a pure function of
        the inputs, so a rerun writes the same record (the wall time is ``self.wall_time_s``)."""
        lp = self.log_prior_at_anchor
        return {
            "log_volume": self.log_volume,
            "log10_volume": self.log10_volume,
            "log_prior_at_anchor": lp,
            "log10_prior_at_anchor": None if lp is None else lp / LN10,
            "log_neighbourhood": self.log_neighbourhood,
            "max_sample_log10": float(self.samples.max() / LN10),
            "median_sample_log10": float(np.median(self.samples) / LN10),
            "max_sample_share": self.max_sample_share,
            "markov": self.markov,
            "n_samples": self.n_samples,
            "n_params": self.n_params,
            "cutoff": self.cutoff,
            "rtol": self.rtol,
            "seed": self.seed,
            "prior": self.prior,
            "preconditioner": self.preconditioner,
            "preconditioner_is_identity": self.preconditioner_is_identity,
            "n_unbounded": self.n_unbounded,
            "cost_evaluations": int(self.cost_evaluations),
            "median_evaluations_per_sample": float(np.median(self.evaluations)),
            **self.meta,
        }


def default_batch_size(n_samples: int, n_params: int) -> int:
    """Directions per cost call when the caller does not choose: min(k, 64, 2^26 // N), ≥ 1.

    64: on the digits MLP (2 CPU cores) 64 directions per pass took 0.50 ms per sample against
    0.61 at 256 (the activations of 256 directions fall out of cache) and 0.63 at 16
    (benchmarks/README.md). 2^26 // N keeps each of the estimator's two (B, N) buffers
    (directions and points) under 2^26 elements, 256 MiB in float32: one direction per pass
    from N = 2^26 ≈ 67 M parameters on. Changing the batch size changes the first guesses of
    later batches, so estimates with different batch sizes differ within the search's rtol.
    """
    return max(1, min(int(n_samples), 64, 2**26 // int(n_params)))


def direction_seed(seed: int, index: int) -> int:
    """The 63-bit generator seed of direction ``index`` under estimate seed ``seed``.

    Derived with ``numpy.random.SeedSequence([seed, index])`` (a hash of both integers), so no
    direction's stream coincides with an ordinary ``torch.manual_seed(j)`` stream for small j
    (which a model's initialisation may have used: a direction correlated with the weights
    biases the estimate). Depends only on (seed, index).
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def sample_directions(n_params: int, indices, *, seed: int, dtype, device, out=None) -> torch.Tensor:
    """Isotropic unit vectors u_i (B, N), one independent stream per sample index.

    Row b is direction ``indices[b]``: a standard normal vector drawn from a generator seeded
    with :func:`direction_seed` (seed, i), then normalised. It depends only on (seed, i) and on
    the device type (CPU and CUDA generators differ), not on the batch size, the batch's other
    indices, resuming, or which process or device of that type draws it.

    Args:
        n_params: N. indices: iterable of non-negative ints. seed: int in [0, 2^32).
        dtype: torch.float32 or torch.float64. device: where to draw and return.
        out: optional (B, N) tensor of that dtype and device to fill (a buffer reused from
            batch to batch: a fresh large tensor costs a page fault per 4 KiB on first write).

    Returns:
        (B, N) tensor of unit rows in ``dtype`` on ``device`` (``out`` if given).
    """
    if out is None:
        out = torch.empty(len(indices), n_params, dtype=dtype, device=device)
    elif (out.shape != (len(indices), n_params) or out.dtype != dtype or not out.is_contiguous()
          or out.device.type != torch.device(device).type):
        raise ValueError(f"out must be a contiguous ({len(indices)}, {n_params}) {dtype} tensor on "
                         f"{device}, got {tuple(out.shape)} {out.dtype} on {out.device}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}")
    gen = torch.Generator(device=device)
    for row, i in enumerate(indices):
        gen.manual_seed(direction_seed(seed, i))
        torch.randn(n_params, generator=gen, dtype=dtype, device=device, out=out[row])
    return out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True))


def estimate_log_volume(
    cost,
    anchor: torch.Tensor,
    *,
    cutoff: float,
    n_samples: int,
    prior,
    preconditioner=None,
    rtol: float = 1e-2,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    max_radius: float | None = None,
    checkpoint_path: str | os.PathLike | None = None,
) -> VolumeEstimate:
    """Estimate the log prior mass of the star domain {θ0 + t v̂ : C < cutoff} (paper §3).

    Args:
        cost: batched cost, (B, N) -> (B,) (e.g. :class:`localvol.ExpectedKL`). Its value at
            the anchor is subtracted, so it need not be 0 there; it must not go below it. Its
            (B, N) argument is a buffer reused from call to call: a cost must not keep it.
        anchor: (N,) float32/float64 tensor θ0 on any device; all work stays there.
        cutoff: float > 0, cost units (nats for KL).
        n_samples: k ≥ 1 Monte Carlo directions.
        prior: :class:`GaussianPrior` (probability, eq. 19) or :class:`LebesguePrior` (volume).
        preconditioner: None (naive, eq. 10) or an object with ``apply((B, N)) -> (B, N)``
            and ``n`` == N, unit determinant (eq. 15-18).
        rtol: relative tolerance of the cost at the returned radius (see find_radius). It biases
            each log term by up to ~N·rtol/2 nats in either direction (radius error rtol/2
            for a locally quadratic cost); lower it when comparing estimates that differ by less.
        batch_size: directions per cost call (None: :func:`default_batch_size`).
        seed: int; direction i depends only on (seed, i).
        progress: show a tqdm progress bar over samples.
        max_radius: Euclidean radius beyond which a direction counts as unbounded (None:
            |θ0| + max σ·(√N + 50) for the Gaussian prior, where the remaining mass is
            negligible; 1e8 for Lebesgue).
        checkpoint_path: optional .npz path; finished samples are written there atomically
            after every batch, and a rerun with the same settings resumes from it. The file
            records a hash of the settings and of localvol's source files
            (:func:`localvol.code_version.source_hash`): one written with other settings, another
            cost or another version of the code raises ValueError instead of being resumed.

    Returns:
        VolumeEstimate (log_volume in nats; +inf for Lebesgue with an unbounded direction).
        Directions that stay below the cutoff up to max_radius are counted in ``n_unbounded``
        and warned about under either prior.

    Raises:
        ValueError: cutoff ≤ 0 or NaN, n_samples < 1, bad rtol/batch_size/max_radius, anchor
            not a finite 1-D float32/64 tensor, wrong prior or preconditioner size, a cost
            not finite at the anchor or below it along a ray, radius-search failures.
    """
    t_start = time.perf_counter()
    cutoff, rtol, _ = _check_search_args(cutoff, rtol, 1.0)
    if (isinstance(n_samples, bool) or not isinstance(n_samples, (int, float, np.integer, np.floating))
            or not math.isfinite(n_samples) or int(n_samples) != n_samples or n_samples < 1):
        raise ValueError(f"n_samples must be an integer ≥ 1, got {n_samples!r}")
    n_samples = int(n_samples)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    if not isinstance(anchor, torch.Tensor) or anchor.ndim != 1 or anchor.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"anchor must be a 1-D float32/float64 tensor, got "
            f"{type(anchor).__name__} {getattr(anchor, 'dtype', '')} {tuple(getattr(anchor, 'shape', ()))}"
        )
    anchor = anchor.detach()
    anchor_norm = math.sqrt(float(row_dot64(anchor)))  # float64: finite iff every entry is
    if not math.isfinite(anchor_norm):
        raise ValueError("anchor has non-finite entries" if not torch.isfinite(anchor).all()
                         else "anchor's norm overflows float64")
    if not isinstance(prior, (GaussianPrior, LebesguePrior)):
        raise ValueError(f"prior must be GaussianPrior or LebesguePrior, got {prior!r}")
    n = anchor.numel()
    if preconditioner is not None and getattr(preconditioner, "n", n) != n:
        raise ValueError(f"preconditioner is for {preconditioner.n} parameters but the anchor has {n}")
    if batch_size is None:
        batch_size = default_batch_size(n_samples, n)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if isinstance(prior, GaussianPrior):  # anchor-only quantities: computed once
        inv_var = prior._inv_var(anchor)  # validates sigma's length
        log_ray_constant = prior.log_ray_constant(anchor)
        log_prior_at_anchor = prior.log_density_at(anchor)
        default_max = anchor_norm + prior.sigma_max * (math.sqrt(n) + 50.0)
    else:
        inv_var = log_ray_constant = log_prior_at_anchor = None
        default_max = 1e8
    max_radius = default_max if max_radius is None else max_radius
    _check_search_args(cutoff, rtol, max_radius)

    fields = ("samples", "radii", "cost_at_radius", "direction_norms", "evaluations", "multipliers")
    store = {f: np.full(n_samples, np.nan) for f in fields}
    done = np.zeros(n_samples, bool)
    anchor_cost = evaluate_anchor_cost(cost, anchor)
    cost_evals = 1
    fingerprint = probe = None
    if checkpoint_path is not None:
        fingerprint = _fingerprint(anchor, cutoff, rtol, seed, prior, preconditioner, max_radius)
        probe = _cost_probe(cost, anchor, anchor_cost, seed)
        cost_evals += 3 + _load_checkpoint(checkpoint_path, fingerprint, probe, store, done)
    todo = np.flatnonzero(~done)
    first = min(len(todo), 16, batch_size)  # a small pilot batch calibrates the first guesses
    batches = [todo[:first]] + [todo[s : s + batch_size] for s in range(first, len(todo), batch_size)]
    # directions u and points θ0 + m v: (B, N) each, allocated once for all batches
    buffers = torch.empty(2, max(map(len, batches)), n, dtype=anchor.dtype, device=anchor.device)
    bar = tqdm(total=n_samples, initial=int(done.sum()), disable=not progress, desc="local volume", unit="dir")
    for idx in batches:
        if len(idx) == 0:
            continue
        u = sample_directions(n, idx, seed=seed, dtype=anchor.dtype, device=anchor.device,
                              out=buffers[0, : len(idx)])  # (B, N)
        if preconditioner is None:
            v = u
        else:  # |u| first: a preconditioner may work in place on u
            log_u_norm = _ray_sums(u, anchor, None)[0]
            v = preconditioner.apply(u)  # (B, N)
            if not isinstance(v, torch.Tensor) or v.shape != u.shape:
                raise ValueError(f"preconditioner.apply returned {_describe(v)} for directions of "
                                 f"shape {tuple(u.shape)}; it must return the same shape")
        # the search runs along v in the anchor's dtype; the prior's coefficients use v as the
        # preconditioner returned it (float64 for a float32 anchor, say), as they always have
        v_search = v.to(anchor.device, anchor.dtype)
        log_v_norm, v_norm, a, b = _ray_sums(v_search, anchor, inv_var, coefficients_of=v)
        if preconditioner is None:
            log_u_norm = log_v_norm
        v = v_search
        guess = _initial_radii(store, done, v_norm)
        if guess is None:
            guess = 1e-3 * max(anchor_norm, 1.0)  # find_radius's own default, without its anchor pass
        res = find_radius(
            cost, anchor, v, cutoff=cutoff, rtol=rtol, max_radius=max_radius,
            initial_radius=guess, anchor_cost=anchor_cost, first_index=int(idx[0]),
            direction_norms=v_norm, points_buffer=buffers[1],
        )
        if isinstance(prior, GaussianPrior):
            store["samples"][idx] = prior.log_terms_from_coefficients(
                n, log_ray_constant, a, b, res.multiplier, log_u_norm)
        else:
            store["samples"][idx] = prior.log_terms(anchor, v, res.multiplier, log_u_norm)
        store["radii"][idx] = res.radius
        store["cost_at_radius"][idx] = res.cost
        store["direction_norms"][idx] = res.direction_norms / np.exp(log_u_norm)
        store["evaluations"][idx] = res.evaluations
        store["multipliers"][idx] = res.multiplier
        done[idx] = True
        cost_evals += int(res.evaluations.sum())
        if checkpoint_path is not None:
            _save_checkpoint(checkpoint_path, fingerprint, probe, store, done, cost_evals)
        bar.update(len(idx))
    bar.close()

    samples = store["samples"]
    n_unbounded = int(np.isinf(store["radii"]).sum())
    if n_unbounded:
        consequence = ("the neighbourhood has infinite Lebesgue volume" if isinstance(prior, LebesguePrior)
                       else "their whole rays count: the cost never reaches the cutoff along them "
                            "(a cutoff above the cost's range, or a cost that does not bound the "
                            "neighbourhood)")
        warnings.warn(
            f"{n_unbounded} of {n_samples} directions stay below the cutoff up to "
            f"max_radius = {max_radius:g}: {consequence}"
        )
    return VolumeEstimate(
        log_volume=float(logsumexp(samples) - math.log(n_samples)),
        samples=samples,
        radii=store["radii"],
        cost_at_radius=store["cost_at_radius"],
        direction_norms=store["direction_norms"],
        evaluations=store["evaluations"].astype(np.int64),
        cost_evaluations=cost_evals,
        log_prior_at_anchor=log_prior_at_anchor,
        n_params=n,
        cutoff=cutoff,
        rtol=rtol,
        seed=seed,
        prior=repr(prior),
        preconditioner=repr(preconditioner) if preconditioner is not None else "naive",
        preconditioner_is_identity=_is_identity(preconditioner),
        n_unbounded=n_unbounded,
        wall_time_s=time.perf_counter() - t_start,
    )


def _is_identity(preconditioner) -> bool:
    """Whether the preconditioner leaves every direction unchanged (all scales 1)."""
    if preconditioner is None:
        return True
    scales = getattr(preconditioner, "scales", None)
    if scales is None:
        return False
    if isinstance(preconditioner, PaperMatrixPreconditioner):
        return False  # diag(p) Vᵀ rotates even when p = 1
    return bool(torch.all(torch.abs(torch.as_tensor(scales).double().log()) < 1e-12))


def _initial_radii(store, done, v_norm):
    """Median radius per unit |v| of finished finite samples, times |v_i| (None if none yet)."""
    m = store["multipliers"][done]
    m = m[np.isfinite(m)]
    if m.size == 0:
        return None
    return float(np.median(m)) * v_norm


def _describe(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _ray_sums(v, anchor, inv_var, coefficients_of=None):
    """The batch's float64 reductions in one pass over v and the anchor.

    Args:
        v: (B, N) directions. anchor: (N,). inv_var: 1/σ² of a Gaussian prior (float or (N,)
            tensor), or None. coefficients_of: the (B, N) tensor whose ray coefficients are
            wanted, if not v (the same directions in another dtype).

    Returns:
        log|v_i| (B,), |v_i| (B,), and the Gaussian prior's ray coefficients a_i = Σ v²/σ²,
        b_i = −Σ v θ0/σ² (eq. 19; see GaussianPrior.ray_coefficients), or None, None
        without one. All float64 NumPy arrays.
    """
    c = v if coefficients_of is None else coefficients_of
    terms = [(v, None, None)]
    if inv_var is not None:
        terms += [(c, None, inv_var), (c, anchor, inv_var)]
    sums = [x.cpu().numpy() for x in row_dots64(*terms)]
    a, b = (sums[1], -sums[2]) if inv_var is not None else (None, None)
    return 0.5 * np.log(sums[0]), np.sqrt(sums[0]), a, b


def _fingerprint(anchor, cutoff, rtol, seed, prior, preconditioner, max_radius) -> str:
    """Hash of everything a checkpoint's samples depend on, except the cost (see _cost_probe)."""
    a = anchor.detach()
    parts = [source_hash(), a.numel(), checksum64(a), float(row_dot64(a)), cutoff, rtol, seed, repr(prior), max_radius]
    if preconditioner is not None:
        parts.append(repr(preconditioner))
        for name in ("scales", "eigenvectors"):
            value = getattr(preconditioner, name, None)
            parts.append(None if value is None else checksum64(value))
    if isinstance(prior, GaussianPrior) and not isinstance(prior.sigma, float):
        parts.append(checksum64(prior.sigma))
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _cost_probe(cost, anchor, anchor_cost, seed) -> np.ndarray:
    """The cost at three fixed points near the anchor: a checkpoint written with another cost
    (another model or data set) does not match and is refused."""
    d = sample_directions(anchor.numel(), [2**31 - 1], seed=seed, dtype=anchor.dtype, device=anchor.device)[0]
    scale = max(float(row_dot64(anchor).sqrt()), 1.0)
    radii = torch.tensor([1e-3, 1e-2, 1e-1], dtype=anchor.dtype, device=anchor.device) * scale
    with torch.no_grad():
        values = cost(anchor[None] + radii[:, None] * d[None])
    return torch.as_tensor(values).detach().double().cpu().numpy().reshape(-1) - anchor_cost


def _load_checkpoint(path, fingerprint, probe, store, done) -> int:
    """Fill store/done from a matching checkpoint; returns the cost evaluations it recorded."""
    path = Path(path)
    if not path.exists():
        return 0
    try:
        f = np.load(path, allow_pickle=False)
        _ = f["fingerprint"], f["probe"], f["done"]
    except Exception as err:  # truncated, corrupted or foreign file
        raise ValueError(f"checkpoint {path} cannot be read ({err!r}); delete it to start afresh") from None
    with f:
        if str(f["fingerprint"]) != fingerprint:
            raise ValueError(
                f"checkpoint {path} was written with different settings (anchor, cutoff, rtol, seed, "
                "prior or preconditioner) or by another version of localvol (its source files "
                "differ); delete it or pass another checkpoint_path"
            )
        if not np.allclose(f["probe"], probe, rtol=1e-4, atol=1e-12, equal_nan=True):
            raise ValueError(
                f"checkpoint {path} was written with a different cost (its values near the anchor "
                f"differ: {f['probe']} vs {probe}); delete it or pass another checkpoint_path"
            )
        saved_done = f["done"]
        k = min(len(saved_done), len(done))
        keep = saved_done[:k]
        for name in store:
            store[name][:k][keep] = f[name][:k][keep]
        done[:k] = keep
        return int(f["cost_evaluations"])


def _save_checkpoint(path, fingerprint, probe, store, done, cost_evals) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, fingerprint=np.array(fingerprint), probe=probe, done=done,
             cost_evaluations=np.array(cost_evals), **store)
    os.replace(tmp, path)
