"""The one sweep driver every experiment uses: a list of estimate units, each a checkpoint ×
series × cutoff with its preconditioner and k, run with resume, recorded in one format and
summarised by one table and one metrics function.

An experiment says only what differs: how to build the :class:`Point` of a checkpoint (its
anchor, cost and preconditioners) and which :class:`Unit` s to estimate. :func:`run_sweep` loads
each checkpoint once, runs its units in order through :func:`localvol.estimate_log_volume` with a
resumable progress file per unit, and returns a :class:`Sweep`; :func:`write_sweep` writes the
stage's estimates JSON, per-sample NPZ, metrics JSON and wall times, then deletes the progress
folder.

Every record holds ``log10_volume`` (the aggregate, logsumexp − log k), ``log10_prior_at_anchor``
(−|θ0|²/(2σ²), docs/method.md#prior-and-neighbourhood-terms), ``log10_neighbourhood`` (the
rest), ``cost_evaluations_per_sample``, ``preconditioner_is_identity`` and ``n_unbounded``, the
unit's ``series``, ``checkpoint`` and ``meta``, and the point's ``info``. Records hold no wall times (a
rerun must write the same bytes); those go to the stage's ``*.timings.json``.
"""
from __future__ import annotations

import contextvars
import hashlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch

import localvol
from localvol._reduce import checksum64
from localvol.distributed import rank_and_world, shard_paths, wait_for_shards
from localvol.estimator import BLOCK_SIZE
from localvol.selection import choose
from localvol.code_version import source_hash
from replication.pipeline.files import save_npz_atomic, write_json_atomic, write_timings

__all__ = ["Unit", "Point", "Sweep", "ShardsDone", "sweep_blocks", "run_sweep", "write_sweep", "summary_table", "summary_metrics",
           "number_grid", "pilot_grid", "choose_point", "check_counts", "check_cutoffs", "parameter_sha256", "check_distinct_steps",
           "time_cost_call", "code_version"]

LN10 = math.log(10.0)
ARRAYS = ("samples", "radii", "cost_at_radius", "direction_norms", "evaluations")
_REPLICATION = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Unit:
    """One estimate of a sweep.

    key: record name, unique in the sweep (and the prefix of its arrays, ``{key}__samples``).
    checkpoint: the experiment's id of the anchor (``"step128"``, ``"clean/step64"``).
    series: legend label (``"naive"``, ``"Adam ν, ε=1e-05"``).
    preconditioner: ``"naive"`` or a name the point's ``preconditioner`` builder knows.
    cutoff: nats of the cost. n_samples: k. eps: the preconditioner's ε (None for naive).
    float64: evaluate this unit's cost and anchor in float64 (the point's ``float64`` copy).
    meta: extra JSON fields of the record (figure, step, run, ...).
    seed, exponent: this unit's direction seed and preconditioner exponent, where they differ
        from the sweep's (None: the sweep's), e.g. a pilot of :mod:`localvol.selection`.
    """

    key: str
    checkpoint: str
    series: str
    preconditioner: str
    cutoff: float
    n_samples: int
    eps: float | None = None
    float64: bool = False
    meta: dict = field(default_factory=dict)
    seed: int | None = None
    exponent: float | None = None


@dataclass
class Point:
    """What the units at one checkpoint share, built once by the experiment.

    anchor: (N,) float32/64 parameters θ0. cost: (B, N) -> (B,) nats, in the anchor's dtype.
    preconditioner: ``(name, eps, exponent, dtype) -> preconditioner`` (eq. 15-18); ``name``
        is a unit's ``preconditioner`` other than ``"naive"``.
    info: JSON fields added to every record of this point (step, anchor RMS, ...).
    float64: optional ``() -> (cost64, anchor64)``, called once, on the first unit that asks.
    """

    anchor: torch.Tensor
    cost: Callable
    preconditioner: Callable[[str, float | None, float, torch.dtype], Any] | None = None
    info: dict = field(default_factory=dict)
    float64: Callable[[], tuple[Callable, torch.Tensor]] | None = None


@dataclass
class Sweep:
    """Output of :func:`run_sweep`: records (JSON-ready, by key), per-sample arrays
    (``{key}__samples`` nats, ``__radii`` parameter units, ``__cost_at_radius`` cost units,
    ``__direction_norms``, ``__evaluations``), wall times by key, and the first cost call's
    seconds (``kl_evaluation_s``)."""

    records: dict[str, dict] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)


def code_version() -> str:
    """Hash of the estimator's and this package's source files (keys every progress file)."""
    return hashlib.sha256((source_hash() + source_hash(_REPLICATION)).encode()).hexdigest()


MERGE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("merge_only", default=False)
"""True while :func:`replication.scale.run_stage` merges what its ranks computed: a unit with
samples missing from the shards is then an error, never recomputed here."""
COMPUTE_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("compute_threads",
                                                                           default=None)
"""Threads for the radius searches of a rank (set by :mod:`replication.scale`'s ranks). The
ranks prepare each checkpoint (its anchor, σ, curvature: what keys the shards) with the thread
count of the process that merges, so both compute those bits alike; only the searches run on
the rank's share of the cores."""


class ShardsDone(Exception):
    """Raised by :func:`run_sweep` on every rank of a multi-process job once all ranks' blocks
    are in the progress shards; :func:`replication.scale.run_stage` then calls the stage again
    in its own process, which finds every sample finished and merges them."""


def sweep_blocks(units: Iterable[Unit], world: int) -> list[dict[str, list[int]]]:
    """Per rank, the blocks of each unit it computes: the (unit, block) pairs in sweep order
    (blocks of :data:`localvol.estimator.BLOCK_SIZE` samples) dealt out round robin, so one
    long unit and many short ones both spread over all ranks."""
    pairs = [(u.key, b) for u in units for b in range(math.ceil(u.n_samples / BLOCK_SIZE))]
    shares: list[dict[str, list[int]]] = [{} for _ in range(world)]
    for i, (key, block) in enumerate(pairs):
        shares[i % world].setdefault(key, []).append(block)
    return shares


def run_sweep(units: Iterable[Unit], load: Callable[[str], Point], *, prior, rtol: float,
              seed: int, batch_size: int, exponent: float, progress_dir: str | Path,
              salt: tuple = (), progress: bool = True, gather: bool = False) -> Sweep:
    """Run every unit, loading each checkpoint's :class:`Point` once (in order of first use).

    Args:
        units: the estimates, in the order to run them; keys must be unique.
        load: checkpoint id -> :class:`Point`.
        prior: :class:`localvol.GaussianPrior` (σ a std) or :class:`localvol.LebesguePrior`.
        rtol, seed, batch_size: as :func:`localvol.estimate_log_volume` (batch = directions per
            cost call); direction i of every unit depends only on (seed, i).
        exponent: the preconditioners' p ∝ 1/(|s|^exponent + ε).
        progress_dir: folder of resumable progress, a subfolder of shards per unit
            (``shard-{rank}.npz``, :mod:`localvol.distributed`). A subfolder's name hashes the
            unit, the anchor, the preconditioner, ``salt`` (what else the cost depends on: the
            evaluation data, the device) and :func:`code_version`, so changed settings or code
            start afresh instead of resuming stale samples. :func:`write_sweep` deletes it.

    In a job of W > 1 ranks (``torchrun``, :mod:`replication.scale`) each rank computes its
    share of the blocks (:func:`sweep_blocks`), loading only the checkpoints it needs, then
    raises :class:`ShardsDone`: the merge is a rerun in one process once every rank has exited
    (:data:`MERGE_ONLY`), which finds every sample finished. The records are the same for any
    W > 1, and within float rounding the same as with one process (docs: README.md, "Many
    processes"). With ``gather``, each rank instead waits for the other ranks' blocks of every
    unit and returns the whole sweep, as one process would: for units whose results decide
    what a stage runs next (a pilot that selects a preconditioner, :mod:`localvol.selection`).

    Returns:
        :class:`Sweep`. Raises ValueError for duplicate keys (and whatever the estimator raises).
    """
    units = list(units)
    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate unit keys: {sorted({k for k in keys if keys.count(k) > 1})}")
    rank, world = rank_and_world()
    mine = sweep_blocks(units, world)[rank]
    sweep = Sweep()
    t_start = time.perf_counter()
    common = dict(prior=prior, rtol=rtol, batch_size=batch_size, progress_dir=progress_dir,
                  salt=salt, progress=progress, rank=rank, world=world)
    for checkpoint in dict.fromkeys(u.checkpoint for u in units):
        todo = [u for u in units if u.checkpoint == checkpoint and u.key in mine]
        if not todo:
            continue
        point = load(checkpoint)
        if "kl_evaluation_s" not in sweep.timings:
            sweep.timings["kl_evaluation_s"] = time_cost_call(point.cost, point.anchor[None])
        cache: dict = {}
        for unit in todo:
            cost, anchor, precond = _unit_inputs(point, unit, exponent, cache)
            _run_unit(sweep, unit, point, cost, anchor, precond,
                      seed=seed if unit.seed is None else unit.seed, blocks=mine[unit.key],
                      wait=False, **common)
    if gather and world > 1:  # every rank's own blocks are done: now wait for the others'
        for checkpoint in dict.fromkeys(u.checkpoint for u in units):
            point, cache = load(checkpoint), {}
            for unit in (u for u in units if u.checkpoint == checkpoint):
                cost, anchor, precond = _unit_inputs(point, unit, exponent, cache)
                _run_unit(sweep, unit, point, cost, anchor, precond,
                          seed=seed if unit.seed is None else unit.seed, blocks=[], wait=True,
                          **common)
    sweep.timings["wall_time_s"] = time.perf_counter() - t_start
    if MERGE_ONLY.get():  # the searches ran in the ranks: these are merge times
        sweep.timings = {"merged_from_ranks": True, **sweep.timings}
    if world > 1 and not gather:  # no barrier: run_stage merges once torchrun has seen every rank exit
        raise ShardsDone(f"rank {rank} of {world}: blocks written to {progress_dir}")
    return sweep


def _unit_inputs(point: Point, unit: Unit, exponent: float, cache: dict):
    """(cost, anchor, preconditioner) of one unit: the point's float64 copy if the unit asks
    for it (built once per point, kept in ``cache``), the preconditioner at the unit's ε and
    exponent (the sweep's exponent unless the unit overrides it)."""
    cost, anchor = point.cost, point.anchor
    if unit.float64:
        if point.float64 is None:
            raise ValueError(f"unit {unit.key} asks for float64 but checkpoint {unit.checkpoint} "
                             "has no float64 copy")
        if "float64" not in cache:
            cache["float64"] = point.float64()
        cost, anchor = cache["float64"]
    precond = None
    if unit.preconditioner != "naive":
        precond = point.preconditioner(unit.preconditioner, unit.eps,
                                       exponent if unit.exponent is None else unit.exponent,
                                       anchor.dtype)
    return cost, anchor, precond


def _run_unit(sweep, unit, point, cost, anchor, precond, *, prior, rtol, seed, batch_size,
              progress_dir, salt, progress, blocks, rank, world, wait) -> None:
    """Search this rank's ``blocks`` of the unit (resuming from its shards). With one process,
    record it; with several, return, unless ``wait``: then load the other ranks' shards until
    every sample is there, and record it."""
    folder = Path(progress_dir) / _progress_name(unit, anchor, precond, prior, rtol, seed,
                                                 batch_size, salt)
    t0 = time.perf_counter()
    run = localvol.VolumeRun(cost, anchor, cutoff=unit.cutoff, n_samples=unit.n_samples,
                             prior=prior, preconditioner=precond, rtol=rtol,
                             batch_size=batch_size, seed=seed, resumable=True)
    for path in shard_paths(folder):
        run.load(path)
    if MERGE_ONLY.get() and not run.done.all():
        raise RuntimeError(
            f"{unit.key}: {int((~run.done).sum())} of {unit.n_samples} samples are not in the "
            f"shards of {folder} although every rank finished: the ranks and this process "
            "disagree on the unit's settings or anchor (thread-dependent sums, another device?); "
            "rerun with scale.processes: 1")
    threads = COMPUTE_THREADS.get()
    setup_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        run.run(blocks, save_to=folder / f"shard-{rank}.npz", progress=progress and rank == 0)
    finally:
        torch.set_num_threads(setup_threads)
    if world > 1 and not wait:
        return  # merged later: by the rerun in one process, or (gather) by this rank
    if world > 1:
        wait_for_shards(run, folder)  # the other ranks' blocks of this unit
    est = run.result()
    record = est.to_dict()
    record.update({"key": unit.key, "checkpoint": unit.checkpoint, "series": unit.series,
                   "preconditioner_name": unit.preconditioner, "eps": unit.eps,
                   "dtype": str(anchor.dtype).removeprefix("torch."), **point.info, **unit.meta})
    lp = record["log_prior_at_anchor"]
    record["log10_neighbourhood"] = None if lp is None else record["log_neighbourhood"] / LN10
    record["cost_evaluations_per_sample"] = est.cost_evaluations / unit.n_samples
    sweep.records[unit.key] = record
    for name in ARRAYS:
        sweep.arrays[f"{unit.key}__{name}"] = getattr(est, name)
    seconds = time.perf_counter() - t0
    sweep.timings[unit.key] = {"wall_time_s": seconds, "seconds_per_sample": seconds / unit.n_samples}
    if progress and rank == 0:
        terms = "" if lp is None else (f" (prior {record['log10_prior_at_anchor']:.6g}, "
                                       f"neighbourhood {record['log10_neighbourhood']:.6g})")
        print(f"{unit.key}: log10 volume {est.log10_volume:.6g}{terms}, "
              f"{seconds / unit.n_samples:.3g} s/sample", flush=True)


def _progress_name(unit: Unit, anchor, precond, prior, rtol, seed, batch_size, salt) -> str:
    parts = (code_version(), unit.key, unit.checkpoint, unit.cutoff, unit.n_samples, unit.eps,
             unit.preconditioner, str(anchor.dtype), anchor.numel(), checksum64(anchor),
             repr(precond), None if precond is None else checksum64(precond.scales),
             repr(prior), rtol, seed, batch_size, BLOCK_SIZE, salt)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def write_sweep(sweep: Sweep, *, config: dict, estimates_path: str | Path,
                samples_path: str | Path, metrics_path: str | Path, progress_dir: str | Path,
                metrics: dict | None = None, extra: dict | None = None) -> dict:
    """Write a finished sweep: the estimates JSON (``{"config", **extra, "estimates"}``), the
    per-sample NPZ, the metrics JSON (``metrics``, default :func:`summary_metrics` of every
    record) and the wall times (``*.timings.json``, outside DVC); then delete ``progress_dir``
    so no resume state is left for a later run to mistake for its own. Returns the summary."""
    summary = {"config": config, **(extra or {}), "estimates": sweep.records}
    write_json_atomic(estimates_path, summary)
    save_npz_atomic(samples_path, **sweep.arrays)
    write_json_atomic(metrics_path, summary_metrics(sweep.records) if metrics is None else metrics)
    write_timings(estimates_path, sweep.timings)
    shutil.rmtree(progress_dir, ignore_errors=True)
    return summary


_TERMS = ("log10_volume", "log10_prior_at_anchor", "log10_neighbourhood")


def summary_metrics(records: dict[str, dict], keys: Iterable[str] | None = None, *,
                    fields: Iterable[str] = _TERMS) -> dict:
    """DVC metrics: ``{key: {field: record[field]}}`` for the given record keys (default: all);
    ``fields`` default to log10_volume, log10_prior_at_anchor, log10_neighbourhood."""
    keys = records if keys is None else keys
    fields = tuple(fields)
    return {k: {t: records[k][t] for t in fields} for k in keys if k in records}


def summary_table(records: dict[str, dict], columns: Iterable[str] = ()) -> pd.DataFrame:
    """One row per record: ``key``, the record fields named in ``columns`` (e.g. figure, series,
    step), then cutoff, k, the aggregate with its prior and neighbourhood terms (log10), the
    largest sample, the share of the largest sample and cost evaluations per sample (wall times
    are in the stage's ``*.timings.json``, outside DVC)."""
    rows = []
    for key, r in records.items():
        rows.append({"key": key, **{c: r.get(c) for c in columns}, "cutoff": r["cutoff"],
                     "k": r["n_samples"], "log10_volume": r["log10_volume"],
                     "log10_prior_term": r["log10_prior_at_anchor"],
                     "log10_neighbourhood": r["log10_neighbourhood"],
                     "max_sample_log10": r["max_sample_log10"],
                     "max_sample_share": r["max_sample_share"],
                     "cost_evaluations_per_sample": r["cost_evaluations_per_sample"]})
    return pd.DataFrame(rows)


def number_grid(value, where: str, *, positive: bool) -> list[float]:
    """A grid of ε (``positive`` False: ≥ 0) or exponents (> 0): a number or a non-empty list of
    finite numbers, distinct at 6 significant digits (they name the pilot units). Raises
    ValueError naming ``where``."""
    values = value if isinstance(value, list) else [value]
    ok = values and all(not isinstance(v, bool) and isinstance(v, (int, float))
                        and math.isfinite(v) and (v > 0 if positive else v >= 0) for v in values)
    if not ok or len({f"{v:g}" for v in values}) != len(values):
        raise ValueError(f"{where} must be a number or a non-empty list of distinct finite "
                         f"numbers {'> 0' if positive else '≥ 0'}, got {value!r}")
    return [float(v) for v in values]


def pilot_grid(key: str, checkpoint: str, kind: str, grid: list[tuple[float, float]], *,
               cutoff: float, n_pilot: int, pilot_seed: int, meta: dict | None = None) -> list[Unit]:
    """The pilot units of one preconditioner ``kind`` over a ``grid`` of (ε, exponent) points,
    for an honest choice among them (:mod:`localvol.selection`, docs/method.md#honest-selection):
    ``n_pilot`` directions of ``pilot_seed`` each (the same directions for every point), key
    ``{key}/eps={ε:g},exponent={exponent:g}``. Run them with ``run_sweep(..., gather=True)``,
    then :func:`choose_point`."""
    return [Unit(key=f"{key}/eps={eps:g},exponent={x:g}", checkpoint=checkpoint,
                 series=f"{key} pilot", preconditioner=kind, cutoff=cutoff, n_samples=n_pilot,
                 eps=eps, exponent=x, seed=pilot_seed,
                 meta={**(meta or {}), "exponent": x, "pilot": True})
            for eps, x in grid]


def choose_point(records: dict[str, dict], key: str, grid: list[tuple[float, float]]
                 ) -> tuple[tuple[float, float], dict]:
    """The grid point with the largest pilot aggregate among the records of
    :func:`pilot_grid` (``key``) (:func:`localvol.selection.choose`: ties to the first), and a
    JSON report: ``chosen`` {eps, exponent} and every ``candidates`` row (ε, exponent, pilot
    log10 volume and largest sample, chosen)."""
    by_point = {(eps, x): records[f"{key}/eps={eps:g},exponent={x:g}"] for eps, x in grid}
    chosen = choose({point: r["log_volume"] for point, r in by_point.items()})
    report = {"chosen": {"eps": chosen[0], "exponent": chosen[1]},
              "candidates": [{"eps": eps, "exponent": x, "pilot_log10_volume": r["log10_volume"],
                              "pilot_max_sample_log10": r["max_sample_log10"],
                              "chosen": (eps, x) == chosen} for (eps, x), r in by_point.items()]}
    return chosen, report


def check_counts(**counts: int) -> None:
    """Every count (k, batch sizes, ...) must be an integer ≥ 1; ValueError names the bad one."""
    for name, v in counts.items():
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {v!r}")


def check_cutoffs(cutoffs: list[float], *, key: str = "cutoffs") -> None:
    """A cutoff sweep must be non-empty, positive and increasing; ValueError names ``key``."""
    if not cutoffs or any(not (c > 0) for c in cutoffs) or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(f"{key} must be positive and increasing, got {cutoffs}")
def parameter_sha256(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's parameters: each name, dtype, shape and the raw bytes, in
    ``named_parameters`` order (the order of ``parameters_to_vector``)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_distinct_steps(hashes: dict, known_duplicates: list, *, key: str | None) -> None:
    """Refuse two checkpoint steps with identical weights (a mislabelled or re-uploaded revision:
    public Pythia revisions have been byte-identical across steps) unless the pair is listed.

    Args:
        hashes: {step: parameter SHA-256} (steps as str or int).
        known_duplicates: [[a, b], ...] step pairs allowed to be equal.
        key: the params.yaml key that lists them (named in the error), or None where no such
            key exists (the checkpoints were trained here: retrain them).

    Raises:
        ValueError naming both steps and the key.
    """
    allowed = {frozenset(int(s) for s in pair) for pair in known_duplicates}
    seen: dict[str, int] = {}
    for step, digest in hashes.items():
        step = int(step)
        if digest in seen and frozenset((seen[digest], step)) not in allowed:
            fix = (f"If the source really holds the same weights at both steps, add "
                   f"[{seen[digest]}, {step}] to {key}" if key else
                   "Rerun the stage that wrote the checkpoints")
            raise ValueError(
                f"checkpoints step {seen[digest]} and step {step} have identical weights (parameter "
                f"SHA-256 {digest[:12]}…): one of them is not the checkpoint it claims to be. {fix}")
        seen.setdefault(digest, step)

def time_cost_call(cost, theta: torch.Tensor) -> float:
    """Seconds of one call ``cost(theta)`` (theta (B, N)), synchronising CUDA around it."""
    if theta.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    cost(theta)
    if theta.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


