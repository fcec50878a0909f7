"""Batched radius search along rays: the radial function r(u) of paper §3.1 (footnote 3).

For each direction d_i we look for a multiplier m_i with Δ(m_i) = C(θ0 + m_i d_i) − C(θ0)
within ``rtol·cutoff`` of the cutoff, and return the Euclidean radius m_i |d_i| AT WHICH THE
COST WAS EVALUATED (the paper's code returned the next, unevaluated guess:
docs/authors-code.md#radius-search).

Search (all directions of the batch in one cost call per round; converged ones drop out):
1. first guess m_0 (the caller's, e.g. the median of earlier batches, or a default);
2. a power-law step m ← m (c/Δ)^(1/p): p = 2 from one point (the local quadratic model of the
   cost, exact for KL near its minimum; or the caller's ``initial_exponent``, e.g. the exponent
   a parent direction's search measured), p fitted in log-log space from the last two points
   afterwards (a secant step on log Δ vs log m);
3. once the root is bracketed, a step outside the bracket (or the 6th+ step) is replaced by
   bisection in log m, so the search always converges for continuous monotone costs.
On a smooth cost this needs 2–4 evaluations per direction at rtol 1e-2, against 10–13 for the
paper's doubling bisection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._reduce import row_dot64

__all__ = ["RadiusResult", "find_radius", "RadiusSearchError"]


class RadiusSearchError(ValueError):
    """The radius search failed along one direction (non-finite cost, no convergence)."""


@dataclass
class RadiusResult:
    """Output of :func:`find_radius`; all arrays are float64/int64 NumPy of shape (B,).

    radius: Euclidean distance from the anchor, parameter units (inf: no boundary found
        up to max_radius). multiplier: radius / |d_i| for the given (non-unit) directions.
    cost: Δ = C(θ0 + m d) − C(θ0) at the returned point, as evaluated (cutoff units; NaN for
        infinite radii, whose last evaluated cost is in ``cost_at_max``).
    evaluations: cost evaluations spent on each direction. anchor_cost: C(θ0).
    exponent: the last fitted d log Δ / d log m (NaN where the search had fewer than two
        points with Δ > 0): hand it to a nearby direction's search as ``initial_exponent``.
    """

    radius: np.ndarray
    multiplier: np.ndarray
    cost: np.ndarray
    evaluations: np.ndarray
    anchor_cost: float
    direction_norms: np.ndarray
    exponent: np.ndarray = None


def evaluate_anchor_cost(cost, anchor: torch.Tensor) -> float:
    """C(θ0) as a Python float; raises ValueError if it is not finite."""
    with torch.no_grad():
        value = cost(anchor[None])
    value = torch.as_tensor(value).reshape(-1)
    if value.numel() != 1:
        raise ValueError(f"cost must map (B, N) to (B,), got {value.numel()} values for B = 1")
    value = float(value[0])
    if not math.isfinite(value):
        raise ValueError(f"the cost at the anchor is not finite: {value!r}")
    return value


def find_radius(
    cost,
    anchor: torch.Tensor,
    directions: torch.Tensor,
    *,
    cutoff: float,
    rtol: float = 1e-2,
    max_radius: float = 1e8,
    initial_radius=None,
    anchor_cost: float | None = None,
    max_evaluations: int = 64,
    first_index: int = 0,
    direction_norms=None,
    points_buffer: torch.Tensor | None = None,
    initial_exponent=None,
) -> RadiusResult:
    """Find, along each direction, the radius where the cost crosses the cutoff.

    Args:
        cost: batched cost, a callable mapping (B, N) parameter vectors (anchor's dtype and
            device) to (B,) costs. Assumed non-decreasing along each ray near the crossing.
        anchor: (N,) float32/float64 tensor θ0, any device.
        directions: (B, N) tensor of directions d_i (need not be unit; radii are Euclidean).
        cutoff: float > 0, in the cost's units (nats for KL), relative to C(θ0).
        rtol: float in (0, 1): accept a point with |Δ − cutoff| ≤ rtol·cutoff.
        max_radius: float > 0 (Euclidean): directions still below the cutoff there get inf.
        initial_radius: optional float or (B,) array: first Euclidean radius to try
            (default 1e-3·max(|θ0|, 1)).
        anchor_cost: C(θ0) if already known (else evaluated here, counted in evaluations of
            no direction).
        max_evaluations: per-direction cap; exceeding it raises RadiusSearchError.
        first_index: index of the first direction in the caller's numbering (error messages).
        direction_norms: optional (B,) float64 array |d_i|, if the caller has them (else one
            float64 pass computes them).
        points_buffer: optional (≥ B, N) tensor of the anchor's dtype and device to write the
            evaluated points into (else one is allocated per call).
        initial_exponent: optional float or (B,) array p of the first power-law step,
            Δ ∝ m^p (default 2; NaN entries: 2; clipped to [0.25, 16]).

    The cost is called with a (b, N) tensor that find_radius reuses from call to call: a cost
    must not keep a reference to its argument (copy it if it needs to).

    Returns:
        RadiusResult.

    Raises:
        ValueError: bad cutoff/rtol/max_radius/shapes; a cost at the anchor that is not finite;
            a cost below the anchor's by more than rtol·cutoff (the anchor must be a minimum).
        RadiusSearchError (a ValueError): a NaN/inf cost not past a bracketed crossing, or
            no convergence within max_evaluations (the message names the direction and its
            last bracket).
    """
    cutoff, rtol, max_radius = _check_search_args(cutoff, rtol, max_radius)
    if anchor.ndim != 1:
        raise ValueError(f"anchor must be 1-D (N,), got shape {tuple(anchor.shape)}")
    if directions.ndim != 2 or directions.shape[1] != anchor.shape[0]:
        raise ValueError(
            f"directions must have shape (B, {anchor.shape[0]}), got {tuple(directions.shape)}"
        )
    directions = directions.to(anchor.device, anchor.dtype)
    n_dir = directions.shape[0]
    if direction_norms is None:
        norms = row_dot64(directions).sqrt().cpu().numpy()
    else:
        norms = np.asarray(direction_norms, dtype=np.float64)
        if norms.shape != (n_dir,):
            raise ValueError(f"direction_norms must have shape ({n_dir},), got {norms.shape}")
    if not np.all(np.isfinite(norms) & (norms > 0)):
        i = int(np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))[0])
        raise ValueError(f"direction {first_index + i} has norm {float(norms[i])!r}; need finite and > 0")
    if anchor_cost is None:
        anchor_cost = evaluate_anchor_cost(cost, anchor)
    np_dtype = np.float32 if anchor.dtype == torch.float32 else np.float64

    if initial_radius is None:
        initial_radius = 1e-3 * max(float(row_dot64(anchor).sqrt()), 1.0)
    r0 = np.broadcast_to(np.asarray(initial_radius, dtype=np.float64), (n_dir,))
    if not np.all(np.isfinite(r0) & (r0 > 0)):
        raise ValueError(f"initial_radius must be finite and > 0, got {r0[~(np.isfinite(r0) & (r0 > 0))][:3]}")
    m_max = max_radius / norms
    p_first = np.full(n_dir, 2.0)
    if initial_exponent is not None:
        given = np.broadcast_to(np.asarray(initial_exponent, dtype=np.float64), (n_dir,))
        p_first = np.where(np.isfinite(given) & (given > 0), np.clip(given, 0.25, 16.0), 2.0)
    m_next = np.minimum(r0 / norms, m_max)

    lo = np.zeros(n_dir)  # largest multiplier known below the cutoff
    hi = np.full(n_dir, np.inf)  # smallest multiplier known above it (or non-finite)
    hi_nonfinite = np.zeros(n_dir, bool)
    prev_m = np.full(n_dir, np.nan)
    prev_d = np.full(n_dir, np.nan)
    last_m = np.full(n_dir, np.nan)
    last_d = np.full(n_dir, np.nan)
    result_m = np.full(n_dir, np.nan)
    result_d = np.full(n_dir, np.nan)
    evals = np.zeros(n_dir, np.int64)
    active = np.ones(n_dir, bool)
    target_lo, target_hi = cutoff * (1 - rtol), cutoff * (1 + rtol)

    if points_buffer is None:
        buffer = torch.empty_like(directions)  # the points θ0 + m_i d_i, reused every round
    elif (points_buffer.ndim != 2 or points_buffer.shape[0] < n_dir or points_buffer.shape[1] != directions.shape[1]
          or points_buffer.dtype != anchor.dtype or points_buffer.device != anchor.device):
        raise ValueError(f"points_buffer must be a (≥{n_dir}, {directions.shape[1]}) {anchor.dtype} tensor on "
                         f"{anchor.device}, got {tuple(points_buffer.shape)} {points_buffer.dtype}")
    else:
        buffer = points_buffer
    while active.any():
        idx = np.flatnonzero(active)
        m = m_next[idx].astype(np_dtype).astype(np.float64)  # exactly representable multipliers
        m_t = torch.as_tensor(m, dtype=anchor.dtype, device=anchor.device)
        with torch.no_grad():
            points = buffer[: len(idx)]  # (b, N)
            if len(idx) == n_dir:
                torch.mul(directions, m_t[:, None], out=points)
            else:  # gather the active rows first (index_select into the buffer: no temporary)
                torch.index_select(directions, 0, torch.as_tensor(idx, device=anchor.device), out=points)
                points.mul_(m_t[:, None])
            points.add_(anchor)  # the same float operations, in the same order, as θ0 + (m d)
            values = cost(points)
        delta = torch.as_tensor(values).detach().reshape(-1).double().cpu().numpy() - anchor_cost
        if delta.shape != (len(idx),):
            raise ValueError(f"cost must map (B, N) to (B,), got {delta.shape[0]} values for B = {len(idx)}")
        evals[idx] += 1

        for j, i in enumerate(idx):
            d, mi = delta[j], m[j]
            if not math.isfinite(d):
                if math.isfinite(hi[i]) and not hi_nonfinite[i]:
                    raise RadiusSearchError(
                        f"cost is {d} at radius {mi * norms[i]:.6g} along direction {first_index + i}, "
                        f"inside the bracket [{lo[i] * norms[i]:.6g}, {hi[i] * norms[i]:.6g}] of a "
                        "crossing: a NaN/inf cost is never accepted"
                    )
                hi[i], hi_nonfinite[i] = mi, True
            elif d < -rtol * cutoff:
                raise ValueError(
                    f"cost is negative relative to the anchor along direction {first_index + i}: "
                    f"C(θ0 + r d̂) − C(θ0) = {d:.6g} at radius {mi * norms[i]:.6g} (cutoff {cutoff}); "
                    "the anchor must be a minimum of the cost (or, for a cutoff near the cost's "
                    "rounding error, e.g. a float32 KL below ~1e-7, evaluate it in float64)"
                )
            elif target_lo <= d <= target_hi:
                result_m[i], result_d[i], active[i] = mi, d, False
                continue
            elif d < cutoff:
                if mi >= m_max[i] * (1 - 1e-6):
                    result_m[i], result_d[i], active[i] = np.inf, np.nan, False
                    continue
                lo[i] = max(lo[i], mi)
            else:
                hi[i], hi_nonfinite[i] = mi, False
            if math.isfinite(d) and d > 0:
                prev_m[i], prev_d[i], last_m[i], last_d[i] = last_m[i], last_d[i], mi, d
            m_next[i] = _next_multiplier(
                mi, d, prev_m[i], prev_d[i], last_m[i], last_d[i], lo[i], hi[i], m_max[i], cutoff, evals[i],
                p_first[i],
            )
            stuck = math.isfinite(hi[i]) and hi[i] <= lo[i] * (1 + 1e-12)
            if evals[i] >= max_evaluations or stuck:
                what = "NaN/inf" if hi_nonfinite[i] else "above the cutoff"
                raise RadiusSearchError(
                    f"radius search did not converge along direction {first_index + i} after "
                    f"{evals[i]} evaluations: last bracket [{lo[i] * norms[i]:.9g}, {hi[i] * norms[i]:.9g}] "
                    f"(cost below the cutoff at the low end, {what} at the high end; last cost {float(d)!r}, "
                    f"cutoff {cutoff}, rtol {rtol}). Is the cost continuous and monotone along the ray?"
                )

    return RadiusResult(
        radius=result_m * norms,
        multiplier=result_m,
        cost=result_d,
        evaluations=evals,
        anchor_cost=anchor_cost,
        direction_norms=norms,
        exponent=_fitted_exponents(prev_m, prev_d, last_m, last_d, result_m, result_d),
    )


def _fitted_exponents(prev_m, prev_d, last_m, last_d, result_m, result_d) -> np.ndarray:
    """Slope of log Δ vs log m through the last two points with Δ > 0 of each search (the
    accepted point included), NaN where there are not two."""
    ok = np.isfinite(result_m) & (result_d > 0)
    # the accepted point was not recorded as "last": it pairs with the last recorded one
    m1, d1 = np.where(ok, last_m, prev_m), np.where(ok, last_d, prev_d)
    m2, d2 = np.where(ok, result_m, last_m), np.where(ok, result_d, last_d)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.log(d2 / d1) / np.log(m2 / m1)
    return np.where(np.isfinite(p) & (p > 0), p, np.nan)


def _next_multiplier(m, d, prev_m, prev_d, last_m, last_d, lo, hi, m_max, cutoff, n_evals, p_first=2.0):
    """Next multiplier to try: power-law (secant in log-log) step, safeguarded by the bracket."""
    if not math.isfinite(d):
        step = None  # non-finite: fall back to bisection below it
    elif d <= 0:
        step = m * 100.0  # below the cost's resolution: jump
    else:
        p = p_first  # local quadratic model, or the caller's exponent
        if math.isfinite(prev_m) and prev_m != last_m and prev_d != last_d:
            fitted = math.log(last_d / prev_d) / math.log(last_m / prev_m)
            if math.isfinite(fitted) and fitted > 0:
                p = min(max(fitted, 0.25), 16.0)
        step = last_m * (cutoff / last_d) ** (1.0 / p)
    if math.isinf(hi):  # not bracketed yet: grow (at most 1000x) up to the maximum radius
        if step is None or not math.isfinite(step):
            step = m * 100.0
        return min(max(step, m * 1.01), m * 1000.0, m_max)
    inside = step is not None and math.isfinite(step) and lo < step < hi
    if inside and n_evals < 6:
        return step
    return math.sqrt(lo * hi) if lo > 0 else 0.5 * hi  # bisection (in log m once lo > 0)


def _check_search_args(cutoff, rtol, max_radius):
    try:
        cutoff, rtol, max_radius = float(cutoff), float(rtol), float(max_radius)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cutoff, rtol and max_radius must be numbers: {err}") from None
    if not math.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"cutoff must be finite and > 0, got {cutoff!r}")
    if not math.isfinite(rtol) or not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    if math.isnan(max_radius) or max_radius <= 0:
        raise ValueError(f"max_radius must be > 0, got {max_radius!r}")
    return cutoff, rtol, max_radius
