"""Local volume of the clean and poisoned ConvNeXt V2 Atto checkpoints (stages
``estimate_figure5``, ``estimate_figure3``, ``estimate_figure7``; paper §4.2;
docs/experiments.md#convnext, docs/authors-code.md#numerical-hazards,
docs/authors-code.md#script-slips, docs/authors-code.md#prior-dominated-interpretation).

Cost: mean KL (nats) from the checkpoint over the first ``n_eval`` evaluation images
(:class:`localvol.ExpectedKL`), in float32; for cutoffs below ``float64_below`` a float64 copy of
the network evaluates it (float32 rounding leaves the KL a few 1e-8 nats of noise, it can even
come out negative: too close to a cutoff of 1e-6). Never the paper's float16, and TF32 is off
on CUDA (it would round weights and inputs to a 10-bit mantissa, the hazard of
docs/authors-code.md#numerical-hazards). Prior N(0, σ²I) with σ = RMS of the runs' shared
initial parameters (step 0; σ a std). Series per run: naive, and Adam ν preconditioned,
p ∝ 1/(ν^exponent + ε) (paper eq. 15-18; ν raw, without bias correction). Every estimate goes through :func:`replication.sweep.run_sweep`.

Record keys (arrays ``{key}__samples`` ... in the stage's NPZ), ``tag`` = naive | adam:
Figure 5 ``ckpt_{run}_{tag}_step{N}`` (every step after 0), Figure 3 ``hist_{run}_{tag}`` (final
step), Figure 7 ``cutoff_{run}_{tag}_{i}`` (final step, i-th cutoff).

Stage arguments (:func:`figure5_stage`, :func:`figure3_stage`, :func:`figure7_stage`; dvc.yaml
injects them): ``dataset_path`` (prepare_cifar's NPZ), ``checkpoints_dir`` (train_convnext's),
``estimates_path``, ``samples_path``, ``metrics_path`` (outputs), ``progress_dir`` (resumable
progress files, deleted at the end); ``n_eval``, ``data_batch_size`` (images per forward pass),
``direction_batch_size`` (directions per cost call), ``vectorize``, ``rtol``, ``seed``,
``exponent``, ``float64_below`` (nats), ``device`` ("auto", "cuda" or "cpu";
:func:`replication.pipeline.devices.resolve_device`): params.yaml ``convnext_estimate``; the
figure's ``cutoff`` / ``cutoffs`` (nats of mean KL), ``adam_eps`` and ``k`` (samples per estimate):
params.yaml ``estimate_figure{3,5,7}``. Each returns its estimates JSON: ``config`` (source,
runs with their histories, steps, n_params, sigma, the settings) and ``estimates`` by key, and
raises ValueError for bad settings (before reading anything, naming the params.yaml key), an
n_eval larger than prepared, or weights that differ from the manifest's hash.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import torch

import localvol
from replication.convnext.checkpoints import load_checkpoint, read_manifest, verify_weights
from replication.convnext.data import load_prepared
from replication.convnext.model import to_float
from replication.pipeline.devices import resolve_device
from replication.sweep import (Point, Unit, check_counts, check_cutoffs, run_sweep,
                               summary_metrics, write_sweep)

__all__ = ["checkpoint_id", "load_point", "initial_sigma", "figure5_units", "figure3_units",
           "figure7_units", "figure5_stage", "figure3_stage", "figure7_stage", "figure3_metrics"]

TAGS = ("naive", "adam")


def checkpoint_id(run: str, step: int) -> str:
    """The sweep's id of a checkpoint: ``"{run}/step{step}"``."""
    return f"{run}/step{step}"


def _parse_id(checkpoint: str) -> tuple[str, int]:
    run, step = checkpoint.rsplit("/step", 1)
    return run, int(step)


@contextlib.contextmanager
def _no_tf32():
    """Turn off TF32 in cuDNN convolutions and CUDA matmuls inside the block (restored after)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def load_point(checkpoint: str, *, checkpoints_dir: str, manifest: dict, images: torch.Tensor,
               data_batch_size: int, vectorize: bool, device: torch.device) -> Point:
    """The :class:`replication.sweep.Point` of one checkpoint (id ``"{run}/step{N}"``, N > 0).

    The weights are checked against the manifest's hash (ValueError if they differ). anchor:
    (N,) float32 on ``device``; cost: :class:`localvol.ExpectedKL` over ``images`` (n, 3, 32,
    32) float32 in [0, 1]; preconditioner ``"adam_nu"``: :class:`localvol.DiagonalPreconditioner`
    of the AdamW ν (float32, or float64 for the float64 copy); float64: a float64 copy of the
    network, images and anchor. info: run, step and the anchor's RMS (parameter units).
    """
    run, step = _parse_id(checkpoint)
    model, state = load_checkpoint(checkpoints_dir, run, step)
    verify_weights(model, manifest, run, step)
    model.to(device)
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()  # (N,) float32
    nu = localvol.adam_moment(model, state, order=2).float()  # on the model's device
    cost = localvol.ExpectedKL(model, images, batch_size=data_batch_size, vectorize=vectorize)

    def preconditioner(name, eps, exponent, dtype):
        if name != "adam_nu":
            raise ValueError(f"unknown ConvNeXt preconditioner {name!r} (only 'adam_nu')")
        return localvol.DiagonalPreconditioner(nu.to(dtype), eps, exponent)

    def float64():
        m64 = copy.deepcopy(model).double()
        return (localvol.ExpectedKL(m64, images.double(), batch_size=data_batch_size,
                                    vectorize=vectorize), anchor.double())

    info = {"run": run, "step": step, "anchor_rms": float(anchor.double().pow(2).mean().sqrt())}
    return Point(anchor=anchor, cost=cost, preconditioner=preconditioner, info=info, float64=float64)


def initial_sigma(checkpoints_dir: str, run: str) -> float:
    """σ of the prior: the RMS (parameter units, a std) of ``run``'s step-0 parameters, which
    every run shares."""
    model0, _ = load_checkpoint(checkpoints_dir, run, 0)
    theta0 = torch.nn.utils.parameters_to_vector(model0.parameters()).detach().double()
    return float(theta0.pow(2).mean().sqrt())


def _unit(key: str, run: str, step: int, tag: str, *, cutoff: float, k: int, adam_eps: float,
          float64_below: float, figure: int) -> Unit:
    adam = tag == "adam"
    return Unit(key=key, checkpoint=checkpoint_id(run, step),
                series=f"{run}, " + (f"Adam ν ε={adam_eps:g}" if adam else "naive"),
                preconditioner="adam_nu" if adam else "naive", cutoff=cutoff, n_samples=k,
                eps=adam_eps if adam else None, float64=cutoff < float64_below,
                meta={"figure": figure})


def figure5_units(runs: list[str], steps: list[int], *, cutoff: float, k: int, adam_eps: float,
                  float64_below: float) -> list[Unit]:
    """Figure 5: every run, every step after 0, naive then Adam ν (``ckpt_{run}_{tag}_step{N}``)."""
    return [_unit(f"ckpt_{run}_{tag}_step{step}", run, step, tag, cutoff=cutoff, k=k,
                  adam_eps=adam_eps, float64_below=float64_below, figure=5)
            for run in runs for step in steps[1:] for tag in TAGS]


def figure3_units(runs: list[str], final: int, *, cutoff: float, k: int, adam_eps: float,
                  float64_below: float) -> list[Unit]:
    """Figure 3: every run's final checkpoint, naive then Adam ν (``hist_{run}_{tag}``)."""
    return [_unit(f"hist_{run}_{tag}", run, final, tag, cutoff=cutoff, k=k, adam_eps=adam_eps,
                  float64_below=float64_below, figure=3) for run in runs for tag in TAGS]


def figure7_units(runs: list[str], final: int, *, cutoffs: list[float], k: int, adam_eps: float,
                  float64_below: float) -> list[Unit]:
    """Figure 7: every run's final checkpoint, naive then Adam ν, each across ``cutoffs``
    (``cutoff_{run}_{tag}_{i}``)."""
    return [_unit(f"cutoff_{run}_{tag}_{i}", run, final, tag, cutoff=c, k=k, adam_eps=adam_eps,
                  float64_below=float64_below, figure=7)
            for run in runs for tag in TAGS for i, c in enumerate(cutoffs)]


def _check_settings(section: str, *, n_eval, data_batch_size, direction_batch_size,
                    float64_below, k, adam_eps, cutoffs) -> None:
    """ValueError naming the params.yaml key (convnext_estimate.* or ``section``.*)."""
    check_counts(**{"convnext_estimate.n_eval": n_eval,
                    "convnext_estimate.data_batch_size": data_batch_size,
                    "convnext_estimate.direction_batch_size": direction_batch_size,
                    f"{section}.k": k})
    check_cutoffs(cutoffs, key=f"{section}.cutoff" + ("s" if section == "estimate_figure7" else ""))
    if not adam_eps >= 0:
        raise ValueError(f"{section}.adam_eps must be ≥ 0, got {adam_eps}")
    if not float64_below >= 0:
        raise ValueError(f"convnext_estimate.float64_below must be ≥ 0 (nats), got {float64_below}")


def _run_figure(figure: int, make_units: Callable[[list[str], list[int]], list[Unit]], *,
                settings: dict, metrics: Callable[[dict, dict], dict] | None, dataset_path,
                checkpoints_dir, estimates_path, samples_path, progress_dir, metrics_path,
                n_eval, data_batch_size, direction_batch_size, vectorize, rtol, seed, exponent,
                float64_below, progress, device: str = "auto") -> dict[str, Any]:
    """Load the data and manifest, run the figure's units through the sweep, write it."""
    device = resolve_device(device, "convnext_estimate.device")  # before reading anything
    data = load_prepared(dataset_path)
    if n_eval > len(data["eval_idx"]):
        raise ValueError(f"convnext_estimate.n_eval {n_eval} > the {len(data['eval_idx'])} "
                         "evaluation images prepared (prepare_cifar.n_eval)")
    images = to_float(data["test_images"][data["eval_idx"][:n_eval]])  # (n_eval, 3, 32, 32)
    manifest = read_manifest(checkpoints_dir)
    runs, steps = list(manifest["runs"]), manifest["steps"]
    sigma = initial_sigma(checkpoints_dir, runs[0])

    def load(checkpoint):
        return load_point(checkpoint, checkpoints_dir=checkpoints_dir, manifest=manifest,
                          images=images, data_batch_size=data_batch_size, vectorize=vectorize,
                          device=device)

    with _no_tf32():
        sweep = run_sweep(make_units(runs, steps), load, prior=localvol.GaussianPrior(sigma),
                          rtol=rtol, seed=seed, batch_size=direction_batch_size,
                          exponent=exponent, progress_dir=progress_dir,
                          salt=(data["source"], n_eval, vectorize, str(device)), progress=progress)
    config = {"figure": figure, "source": manifest["source"], "runs": manifest["runs"],
              "steps": steps, "n_params": manifest["n_params"], "sigma": sigma, **settings,
              "rtol": rtol, "seed": seed, "exponent": exponent, "n_eval": n_eval,
              "data_batch_size": data_batch_size, "direction_batch_size": direction_batch_size,
              "vectorize": vectorize, "dtype": f"float32 (float64 for cutoffs below {float64_below:g})",
              "float64_below": float64_below, "device": str(device), "tf32": False}
    return write_sweep(sweep, config=config, estimates_path=estimates_path,
                       samples_path=samples_path, metrics_path=metrics_path,
                       progress_dir=progress_dir,
                       metrics=None if metrics is None else metrics(sweep.records, config))


def figure5_stage(*, cutoff: float, adam_eps: float, k: int, float64_below: float,
                  progress: bool = True, **common) -> dict[str, Any]:
    """Run the ``estimate_figure5`` stage: for each run, naive and Adam ν estimates at every
    checkpoint after step 0, at ``cutoff``. Arguments and errors: module docstring."""
    _check_settings("estimate_figure5", k=k, adam_eps=adam_eps, cutoffs=[cutoff],
                    float64_below=float64_below, **_counts(common))
    return _run_figure(5, lambda runs, steps: figure5_units(
        runs, steps, cutoff=cutoff, k=k, adam_eps=adam_eps, float64_below=float64_below),
        settings={"cutoff": cutoff, "adam_eps": adam_eps, "k": k}, metrics=None,
        float64_below=float64_below, progress=progress, **common)


def figure3_stage(*, cutoff: float, adam_eps: float, k: int, float64_below: float,
                  progress: bool = True, **common) -> dict[str, Any]:
    """Run the ``estimate_figure3`` stage: for each run, naive and Adam ν estimates at the final
    checkpoint (the per-sample histograms); metrics :func:`figure3_metrics`. Arguments and
    errors: module docstring."""
    _check_settings("estimate_figure3", k=k, adam_eps=adam_eps, cutoffs=[cutoff],
                    float64_below=float64_below, **_counts(common))
    return _run_figure(3, lambda runs, steps: figure3_units(
        runs, steps[-1], cutoff=cutoff, k=k, adam_eps=adam_eps, float64_below=float64_below),
        settings={"cutoff": cutoff, "adam_eps": adam_eps, "k": k}, metrics=figure3_metrics,
        float64_below=float64_below, progress=progress, **common)


def figure7_stage(*, cutoffs: list[float], adam_eps: float, k: int, float64_below: float,
                  progress: bool = True, **common) -> dict[str, Any]:
    """Run the ``estimate_figure7`` stage: for each run, naive and Adam ν estimates at the final
    checkpoint across ``cutoffs``. Arguments and errors: module docstring."""
    _check_settings("estimate_figure7", k=k, adam_eps=adam_eps, cutoffs=cutoffs,
                    float64_below=float64_below, **_counts(common))
    return _run_figure(7, lambda runs, steps: figure7_units(
        runs, steps[-1], cutoffs=cutoffs, k=k, adam_eps=adam_eps, float64_below=float64_below),
        settings={"cutoffs": cutoffs, "adam_eps": adam_eps, "k": k}, metrics=None,
        float64_below=float64_below, progress=progress, **common)


def _counts(common: dict) -> dict:
    return {name: common[name] for name in ("n_eval", "data_batch_size", "direction_batch_size")}


def figure3_metrics(records: dict, config: dict) -> dict[str, Any]:
    """Headline numbers for DVC: σ, the data source, each run's final validation and poison
    accuracy, the four Figure 3 aggregates (log10, with their prior and neighbourhood terms) as
    ``{run}_{tag}``, and ``poisoned_smaller_{tag}``: whether the poisoned volume is smaller."""
    out: dict[str, Any] = {"sigma": config["sigma"], "data_source": config["source"]}
    terms = summary_metrics(records)
    for run, r in config["runs"].items():
        last = r["history"][-1]
        out[f"{run}_val_accuracy"] = last.get("val_accuracy")
        out[f"{run}_poison_accuracy"] = last.get("poison_accuracy")
        for tag in TAGS:
            if f"hist_{run}_{tag}" in terms:
                out[f"{run}_{tag}"] = terms[f"hist_{run}_{tag}"]
    if "clean_naive" in out and "poisoned_naive" in out:
        for tag in TAGS:
            out[f"poisoned_smaller_{tag}"] = bool(
                out[f"poisoned_{tag}"]["log10_volume"] < out[f"clean_{tag}"]["log10_volume"])
    return out
