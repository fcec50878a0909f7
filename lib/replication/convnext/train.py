"""Training ConvNeXt V2 Atto on CIFAR-10, clean and poisoned (stage ``train_convnext``,
:func:`train_stage`; paper §4.2, Figures 3, 5, 7; docs/experiments.md#convnext).

One run per entry of ``runs`` (``clean``: poison probability 0; ``poisoned``: 0.4), each in its
own folder (:mod:`.checkpoints`). Both runs start from the same seeded initialisation (step 0 is
saved: σ of the estimates is its RMS). AdamW (β 0.9/0.95, ε 1e-8, weight decay 0.05 except
biases and LayerNorms, as the Hugging Face Trainer the paper used), cosine schedule with linear
warm-up (``transformers.get_cosine_schedule_with_warmup``), bf16 autocast on CUDA, float32 on
CPU; the batches, loss and augmentation of :mod:`.model`. The paper's "unpoisoned" run used
poison probability ≈ 0.001; ours uses exactly 0. Checkpoints at steps 0, 1, 2, 4, …, max_steps,
each with the accuracy and loss on fixed clean, poison and validation subsets (the Figure 5
curves).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replication.convnext.checkpoints import (MANIFEST, load_checkpoint, log_spaced_steps,
                                              save_step)
from replication.convnext.data import load_prepared
from replication.convnext.model import (AUGMENT, augment, decay_groups, evaluate, make_model,
                                        poison_loss, quiet_transformers, sample_batch, step_seed)
from replication.pipeline import write_csv_atomic, write_json_atomic, write_timings
from replication.pipeline.devices import resolve_device
from replication.sweep import check_distinct_steps, code_version, parameter_sha256

__all__ = ["train_run", "train_stage"]


def _curve_subsets(data: dict, n_curve: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fixed clean, poison and validation subsets (n_curve images each) for the curves."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("clean", "poison"):
        idx = data[f"{name}_idx"]
        idx = idx[rng.permutation(len(idx))[:n_curve]]
        out[name] = (data["train_images"][idx], data["train_labels"][idx])
    ev = data["eval_idx"][:n_curve]
    out["val"] = (data["test_images"][ev], data["test_labels"][ev])
    return out


def _data_fingerprint(data: dict) -> str:
    """SHA-256 of the training images, labels and split indices (what a run trains on)."""
    h = hashlib.sha256()
    for key in ("train_images", "train_labels", "clean_idx", "poison_idx", "eval_idx"):
        h.update(np.ascontiguousarray(data[key]).tobytes())
    return h.hexdigest()


def _check_settings(*, max_steps, batch_size, n_curve, warmup, betas, max_grad_norm) -> list[int]:
    """Validate the training settings (ValueError naming the train_convnext key); the steps."""
    steps = log_spaced_steps(max_steps)
    for name, v in {"batch_size": batch_size, "n_curve": n_curve}.items():
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r} "
                             f"(params.yaml train_convnext.{name})")
    if not 0 <= warmup <= max_steps:
        raise ValueError(f"warmup must be in [0, max_steps={max_steps}], got {warmup} "
                         "(params.yaml train_convnext.warmup)")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas} "
                         "(params.yaml train_convnext.betas)")
    if not max_grad_norm >= 0:
        raise ValueError(f"max_grad_norm must be ≥ 0 (0: no clipping), got {max_grad_norm} "
                         "(params.yaml train_convnext.max_grad_norm)")
    return steps


def _restart_if_changed(run_dir: Path, config: dict, progress: bool) -> None:
    """Delete ``run_dir`` unless its ``config.json`` equals ``config``; then write it."""
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        try:
            same = json.loads(cfg_path.read_text()) == config
        except json.JSONDecodeError:
            same = False
        if not same:
            if progress:
                print(f"{run_dir}: settings, data or code version changed, starting over", flush=True)
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg_path, config)


def _optimizer(model, *, lr, betas, adam_eps, weight_decay, warmup, max_steps):
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=adam_eps)
    return opt, get_cosine_schedule_with_warmup(opt, warmup, max_steps)


def _start(run_dir: Path, steps: list[int], device, *, seed, model_overrides, progress, **opt_kw):
    """(model, optimizer, scheduler, first step, history): fresh, or resumed from the last
    complete ``step{N}/`` of ``run_dir``."""
    from transformers import ConvNextV2ForImageClassification

    model = make_model(seed, **(model_overrides or {})).to(device)
    opt, sched = _optimizer(model, **opt_kw)
    done = [s for s in steps if (run_dir / f"step{s}" / "metrics.json").exists()]
    if not done:
        return model, opt, sched, 0, []
    start = max(done)
    d = run_dir / f"step{start}"
    model = ConvNextV2ForImageClassification.from_pretrained(d).float().to(device)
    opt, sched = _optimizer(model, **opt_kw)
    sched.load_state_dict(torch.load(d / "scheduler.pt"))
    # after the scheduler, whose constructor resets each group's lr to the step-0 value
    opt.load_state_dict(torch.load(d / "optimizer.pt", map_location=device))
    history = [json.loads((run_dir / f"step{s}" / "metrics.json").read_text()) for s in done]
    if progress:
        print(f"{run_dir}: resuming at step {start}", flush=True)
    return model, opt, sched, start, history


def _train_step(step, model, opt, sched, images, labels, data, device, *, seed, batch_size,
                poison_probability, max_grad_norm) -> float:
    """One optimizer step; every random draw seeded by (seed, step). Returns the loss (nats)."""
    idx, is_poison = sample_batch(step, seed=seed, batch_size=batch_size,
                                  clean_idx=data["clean_idx"], poison_idx=data["poison_idx"],
                                  poison_probability=poison_probability,
                                  key="params.yaml train_convnext.runs")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(step_seed(seed, step, AUGMENT))  # augmentation and drop path
        x = augment(images[idx]).to(device)
        y = labels[idx].to(device)
        model.train()
        with autocast:
            logits = model(x).logits
        loss = poison_loss(logits, y, torch.from_numpy(is_poison).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
    return float(loss.detach())


def _checkpoint_record(step, model, subsets, losses, device) -> dict:
    """The history entry of a checkpoint: train loss since the last one, curves, weight hash."""
    record = {"step": step, "train_loss": float(np.mean(losses)) if losses else None}
    for name, (x, y) in subsets.items():
        for k, v in evaluate(model, x, y, device=device).items():
            record[f"{name}_{k}"] = v
    record["parameter_sha256"] = parameter_sha256(model)
    return record


def _loop(run_dir: Path, steps, model, opt, sched, start, history, data, device, timings, *,
          seed, batch_size, n_curve, poison_probability, max_grad_norm, progress) -> list[dict]:
    """Train from ``start`` to ``steps[-1]``, saving each checkpoint step not yet in ``history``."""
    max_steps, done = steps[-1], {h["step"] for h in history}
    subsets = _curve_subsets(data, n_curve, seed)
    images, labels = torch.from_numpy(data["train_images"]), torch.from_numpy(data["train_labels"])
    losses, t_last = [], time.perf_counter()
    t_start = t_last
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, initial=start, desc=run_dir.name, unit="step")
    for step in range(start, max_steps + 1):
        if step in steps and step not in done:
            n_images = (step - (history[-1]["step"] if history else 0)) * batch_size
            timings[f"step{step}"] = {"images_per_s": n_images / (time.perf_counter() - t_last)
                                      if n_images else None}
            record = _checkpoint_record(step, model, subsets, losses, device)
            timings[f"step{step}"]["wall_time_s"] = time.perf_counter() - t_start
            save_step(run_dir, step, model, opt, sched, record)
            history.append(record)
            losses, t_last = [], time.perf_counter()
        if step == max_steps:
            break
        losses.append(_train_step(step, model, opt, sched, images, labels, data, device, seed=seed,
                                  batch_size=batch_size, poison_probability=poison_probability,
                                  max_grad_norm=max_grad_norm))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    return history


def train_run(run_dir: str | Path, data: dict, *, poison_probability: float, max_steps: int,
              batch_size: int, lr: float, betas: tuple[float, float], adam_eps: float,
              weight_decay: float, warmup: int, max_grad_norm: float, seed: int, n_curve: int,
              model_overrides: dict | None = None, device: str | None = None,
              progress: bool = True, timings: dict | None = None) -> list[dict]:
    """Train one network (module docstring) and save its log-spaced checkpoints.

    Resumes from the last complete ``step{N}/`` when ``run_dir/config.json`` matches these
    settings, the data (hashed), the device type and the source code
    (:func:`replication.sweep.code_version`, a hash of every source file of localvol and
    replication, so no edit can leave checkpoints of other code in place); a folder from
    anything else is deleted and the run starts over. The resumed run is bit-identical to an
    uninterrupted one on CPU; on CUDA, cuDNN's backward passes are not deterministic.

    Args:
        run_dir: the run's folder. data: :func:`replication.convnext.data.load_prepared`'s dict.
        poison_probability: probability that an example comes from the poison split.
        max_steps: optimizer steps (paper 65,536); batch_size: images per step (paper 128).
        lr, betas, adam_eps, weight_decay: AdamW; warmup: linear warm-up steps, then cosine to 0.
        max_grad_norm: clip the gradient norm to this (the Hugging Face Trainer's default 1.0,
            which the paper's training script used); 0 turns clipping off.
        seed: initialisation and every random draw. n_curve: images per curve subset.
        model_overrides: changes to :data:`~replication.convnext.model.ATTO_CONFIG`.
        device: "auto" (or None: CUDA when available), "cuda" (required) or "cpu"
            (:func:`replication.pipeline.devices.resolve_device`).
        timings: optional dict; receives ``step{N}`` → {images_per_s, wall_time_s} for the
            checkpoints this call wrote (wall times stay out of the checkpoints, which DVC
            hashes).

    Returns:
        The history: one dict per checkpoint step with ``step``, ``train_loss`` (mean poison
        loss since the previous checkpoint, nats), ``{clean,poison,val}_{accuracy,loss}`` and
        ``parameter_sha256`` (of the weights saved at that step).

    Raises:
        ValueError for bad settings (naming the params.yaml train_convnext key).
    """
    quiet_transformers()
    run_dir = Path(run_dir)
    device = resolve_device(device or "auto", "train_convnext.device")
    steps = _check_settings(max_steps=max_steps, batch_size=batch_size, n_curve=n_curve,
                            warmup=warmup, betas=betas, max_grad_norm=max_grad_norm)
    config = {"code_version": code_version(), "poison_probability": poison_probability,
              "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "betas": list(betas),
              "adam_eps": adam_eps, "weight_decay": weight_decay, "warmup": warmup,
              "max_grad_norm": max_grad_norm, "seed": seed, "n_curve": n_curve,
              "model_overrides": model_overrides or {}, "data_source": data["source"],
              "data_sha256": _data_fingerprint(data), "device_type": device.type}
    _restart_if_changed(run_dir, config, progress)
    model, opt, sched, start, history = _start(
        run_dir, steps, device, seed=seed, model_overrides=model_overrides, progress=progress,
        lr=lr, betas=betas, adam_eps=adam_eps, weight_decay=weight_decay, warmup=warmup,
        max_steps=max_steps)
    return _loop(run_dir, steps, model, opt, sched, start, history, data, device,
                 {} if timings is None else timings, seed=seed, batch_size=batch_size,
                 n_curve=n_curve, poison_probability=poison_probability,
                 max_grad_norm=max_grad_norm, progress=progress)


CURVE_METRICS = ("train_loss", "clean_accuracy", "clean_loss", "poison_accuracy", "poison_loss",
                 "val_accuracy", "val_loss")


def history_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The training curves of every run as one row per checkpoint step, columns
    ``step`` then ``<run>_<metric>`` for each metric of :data:`CURVE_METRICS` (the CSV that
    ``dvc plots`` draws; a metric a step lacks, such as step 0's train loss, is left empty)."""
    rows: dict[int, dict[str, Any]] = {}
    for name, run in manifest["runs"].items():
        for h in run["history"]:
            row = rows.setdefault(h["step"], {"step": h["step"]})
            row.update({f"{name}_{m}": h.get(m) for m in CURVE_METRICS})
    return [rows[s] for s in sorted(rows)]


def train_stage(*, dataset_path: str, checkpoints_dir: str, metrics_path: str, history_path: str,
                runs: dict,
                max_steps: int, batch_size: int, lr: float, betas: list[float], adam_eps: float,
                weight_decay: float, warmup: int, max_grad_norm: float, seed: int, n_curve: int,
                model_overrides: dict | None = None, device: str = "auto",
                progress: bool = True) -> dict[str, Any]:
    """Run the ``train_convnext`` stage: :func:`train_run` for each ``runs`` entry
    (``{name: {"poison_probability": p}}``), then write the manifest, the metrics JSON (final
    accuracies and losses per run, the data source) and the curves CSV (``history_path``,
    :func:`history_rows`). Returns the manifest. ``device``:
    ``train_convnext.device`` (:func:`replication.pipeline.devices.resolve_device`).

    Raises:
        ValueError: empty ``runs`` or an entry with other keys (params.yaml train_convnext.runs),
        ``device`` "cuda" without a GPU, or not one of auto/cuda/cpu (train_convnext.device),
        bad settings (:func:`train_run`), or two checkpoint steps with identical weights (other
        than steps 0 and 1 with a warm-up: transformers' warm-up starts at lr 0, so the first
        update changes nothing, as in the paper's Hugging Face Trainer runs).
    """
    if not runs:
        raise ValueError("runs is empty: give e.g. {clean: {poison_probability: 0.0}} "
                         "(params.yaml train_convnext.runs)")
    device = str(resolve_device(device, "train_convnext.device"))  # before any work
    data = load_prepared(dataset_path)
    manifest = {"runs": {}, "steps": log_spaced_steps(max_steps), "source": data["source"],
                "seed": seed, "batch_size": batch_size}
    timings: dict[str, Any] = {}
    for name, run in runs.items():
        if set(run) != {"poison_probability"}:
            raise ValueError(f"train_convnext.runs.{name} must have exactly the key "
                             f"poison_probability, got {sorted(run)}")
        history = train_run(Path(checkpoints_dir) / name, data,
                            poison_probability=float(run["poison_probability"]),
                            max_steps=max_steps, batch_size=batch_size, lr=lr, betas=tuple(betas),
                            adam_eps=adam_eps, weight_decay=weight_decay, warmup=warmup,
                            max_grad_norm=max_grad_norm, seed=seed,
                            n_curve=n_curve, model_overrides=model_overrides, device=device,
                            progress=progress,
                            timings=timings.setdefault(name, {}))
        first_update_is_zero = [[0, 1]] if warmup > 0 else []  # lr 0 at step 0: allowed
        check_distinct_steps({h["step"]: h["parameter_sha256"] for h in history},
                             first_update_is_zero, key=None)
        manifest["runs"][name] = {"poison_probability": float(run["poison_probability"]),
                                  "history": history}
    model, _ = load_checkpoint(checkpoints_dir, next(iter(runs)), 0)
    manifest["n_params"] = sum(p.numel() for p in model.parameters())
    write_json_atomic(Path(checkpoints_dir) / MANIFEST, manifest)
    metrics = {name: {k: v for k, v in r["history"][-1].items() if k.endswith(("accuracy", "loss"))}
               for name, r in manifest["runs"].items()}
    metrics["data_source"] = data["source"]
    write_json_atomic(metrics_path, metrics)
    write_csv_atomic(history_path, history_rows(manifest))
    write_timings(metrics_path, timings)
    return manifest
