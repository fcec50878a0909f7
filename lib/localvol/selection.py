"""Honest choice of a preconditioner (its ε and exponent) on pilot directions that are then
thrown away (docs/method.md#honest-selection).

Any fixed preconditioner gives an unbiased estimator of the volume (eq. 15), so by Markov's
inequality (eq. 14) its estimate exceeds the truth by m orders of magnitude with probability at
most 10⁻ᵐ: an approximate high-probability lower bound. Choosing the
preconditioner *after* seeing its samples breaks that: the largest of several noisy estimates is
biased upwards. The paper chose each ε by the largest sample over a grid, on the very samples it
reported. Here the choice is made on a pilot of k₀ directions per candidate (the same pilot
directions for every candidate, so they are compared on equal terms), and the chosen
candidate's estimate is computed afresh on k directions of another seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping

import torch

from .estimator import VolumeEstimate, estimate_log_volume

__all__ = ["Selection", "Table", "choose", "check_seeds", "select_and_estimate"]


class Table(list):
    """Rows (dicts with the same keys) that print as an aligned text table.

    A list of the row dicts (indexing, iteration, ``len``, ``==`` with a list of dicts work as
    before), also available as ``.rows``; ``str()`` and ``repr()`` give one header line and one
    line per row, columns padded to their widest entry, floats with 2 decimals, True as "yes"."""

    @property
    def rows(self) -> list[dict]:
        return list(self)

    def __str__(self) -> str:
        if not self:
            return "(no rows)"
        keys = list(self[0])
        cells = [keys] + [[_cell(row.get(k)) for k in keys] for row in self]
        widths = [max(len(line[j]) for line in cells) for j in range(len(keys))]
        numeric = [all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
                       for row in self) for k in keys]
        lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric)).rstrip()
                 for line in cells]
        return "\n".join(lines)

    __repr__ = __str__


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def choose(pilot_log_volumes: Mapping[str, float]) -> str:
    """The candidate with the largest pilot aggregate (log volume, any base); ties go to the
    first in the mapping's order.

    Raises:
        ValueError: if the mapping is empty or an aggregate is NaN (the key is named).
    """
    if not pilot_log_volumes:
        raise ValueError("no candidates to choose from")
    for name, value in pilot_log_volumes.items():
        if math.isnan(value):
            raise ValueError(f"pilot aggregate of candidate {name!r} is NaN")
    best = max(pilot_log_volumes.values())
    return next(name for name, value in pilot_log_volumes.items() if value == best)


def check_seeds(seed: int, pilot_seed: int, *, keys: tuple[str, str] = ("seed", "pilot_seed")) -> None:
    """The pilot's directions must not be the estimate's: ValueError (naming ``keys``) unless
    both seeds are integers in [0, 2^32) and differ. Direction i of seed s is drawn from a hash
    of (s, i) (:func:`localvol.directions.direction_seed`), so different seeds give independent
    streams."""
    for key, value in zip(keys, (seed, pilot_seed)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
            raise ValueError(f"{key} must be an integer in [0, 2^32), got {value!r}")
    if seed == pilot_seed:
        raise ValueError(f"{keys[1]} ({pilot_seed}) must differ from {keys[0]} ({seed}): the "
                         "pilot's directions choose the preconditioner and must not be reused "
                         "by the estimate")


@dataclass
class Selection:
    """Result of :func:`select_and_estimate`.

    chosen: name of the selected candidate. pilot: every candidate's pilot estimate (k₀ =
    ``n_pilot`` directions of ``pilot_seed``), by name, in the given order. estimate: the chosen
    candidate's estimate on k = ``n_samples`` fresh directions (``seed``): the number to report.
    """

    chosen: str
    pilot: dict[str, VolumeEstimate]
    estimate: VolumeEstimate
    seed: int
    pilot_seed: int
    n_pilot: int
    n_samples: int

    def table(self) -> Table:
        """One row per candidate: ``name``, ``pilot_log10_volume``, ``pilot_max_sample_log10``,
        ``chosen`` (bool): a :class:`Table`, a list of those dicts that prints aligned
        (``print(sel.table())``)."""
        return Table({"name": name, "pilot_log10_volume": est.log10_volume,
                 "pilot_max_sample_log10": float(est.samples.max()) / math.log(10),
                 "chosen": name == self.chosen}
                for name, est in self.pilot.items())


def select_and_estimate(cost, anchor: torch.Tensor, candidates: Mapping[str, object], *,
                        cutoff: float, n_pilot: int, n_samples: int, prior, seed: int,
                        pilot_seed: int, rtol: float = 1e-2, batch_size: int | None = None,
                        max_radius: float | None = None, progress: bool = False) -> Selection:
    """Choose a preconditioner on a pilot, then estimate with it on fresh directions.

    1. Every candidate is estimated on the same ``n_pilot`` directions (seed ``pilot_seed``).
    2. The one with the largest pilot aggregate is chosen (:func:`choose`).
    3. The chosen one is estimated on ``n_samples`` directions of ``seed``; the pilot samples
       are not part of it, so the reported estimate keeps the guarantee of eq. 14.

    Args:
        cost, anchor, cutoff, prior, rtol, batch_size, max_radius, progress: as
            :func:`localvol.estimate_log_volume`.
        candidates: a mapping name -> preconditioner (an object with ``apply``; None is the
            naive estimator), e.g. one per (ε, exponent) of a grid. All are held at once: for a
            grid of dense preconditioners decompose H once and build each with
            ``MatrixPreconditioner.from_eigh(eigenvalues, eigenvectors, eps, exponent)``, which
            shares the eigenvectors (8N² bytes) instead of copying them per candidate.
        n_pilot: k₀ ≥ 1 directions per candidate. n_samples: k ≥ 1 of the final estimate.
        seed, pilot_seed: direction seeds of the estimate and of the pilot; must differ.
        progress: default False here (True in :func:`localvol.estimate_log_volume`).

    Nothing here is resumable: for long runs, estimate each candidate with
    :func:`localvol.estimate_log_volume` and its ``checkpoint_path``, then :func:`choose`.
    (The pilot here is not the radius search's pilot, the first 16 directions of every
    estimate that guide the first guesses of the others: docs/method.md#radius-search.)

    Returns:
        :class:`Selection` (log volumes in nats in its estimates, log10 in its table).

    Raises:
        ValueError: no candidates, equal seeds, a NaN pilot aggregate, or what
            :func:`localvol.estimate_log_volume` raises.
    """
    if not isinstance(candidates, Mapping) or not candidates:
        raise ValueError("candidates must be a non-empty mapping name -> preconditioner (None = "
                         f"naive), got {type(candidates).__name__} {candidates!r:.80}")
    for name, value in (("n_pilot", n_pilot), ("n_samples", n_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    check_seeds(seed, pilot_seed)
    common = dict(cutoff=cutoff, prior=prior, rtol=rtol, batch_size=batch_size,
                  max_radius=max_radius, progress=progress)
    pilot = {name: estimate_log_volume(cost, anchor, n_samples=n_pilot, seed=pilot_seed,
                                       preconditioner=precond, **common)
             for name, precond in candidates.items()}
    chosen = choose({name: est.log_volume for name, est in pilot.items()})
    estimate = estimate_log_volume(cost, anchor, n_samples=n_samples, seed=seed,
                                   preconditioner=candidates[chosen], **common)
    return Selection(chosen=chosen, pilot=pilot, estimate=estimate, seed=seed,
                     pilot_seed=pilot_seed, n_pilot=n_pilot, n_samples=n_samples)
