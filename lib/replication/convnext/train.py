"""ConvNeXt V2 Atto on CIFAR-10, clean and poisoned (paper §4.2, Figures 3, 5, 7;
REPLICATION.md §5.2, §7.1, §7.3, §7.4, §7.5).

Training (stage ``train_convnext``, :func:`train_stage`), one run per entry of ``runs``
(``clean``: poison probability 0; ``poisoned``: 0.4), each in its own folder::

    CHECKPOINTS/manifest.json                      (runs, steps, N, data source, histories)
    CHECKPOINTS/<run>/config.json                  (the run's settings; a change restarts it)
    CHECKPOINTS/<run>/step{N}/config.json, model.safetensors   (save_pretrained)
    CHECKPOINTS/<run>/step{N}/optimizer.pt, scheduler.pt, metrics.json

- Model: ``ConvNextV2ForImageClassification`` with :data:`ATTO_CONFIG` (3,388,810 parameters);
  both runs start from the same seeded initialisation (step 0 is saved: σ is its RMS).
- AdamW (β 0.9/0.95, ε 1e-8, weight decay 0.05 except biases and LayerNorms, as the Hugging
  Face Trainer the paper used), cosine schedule with linear warm-up
  (``transformers.get_cosine_schedule_with_warmup``), bf16 autocast on CUDA, float32 on CPU.
- Each example of a batch comes from the poison split with probability ``poison_probability``
  (a seeded Bernoulli draw per example; uniform index within the split), else from the clean
  split (Huang et al. 2020 as in the paper's code, whose interleaving was unseeded). Loss
  (:func:`poison_loss`): −log p_y for clean, −log(1 − p_y) for poison examples, batch mean.
  The paper's "unpoisoned" run used poison probability ≈ 0.001; ours uses exactly 0.
- Augmentation (torchvision transforms v2): RandAugment → horizontal flip → random crop 32,
  padding 4 → float in [0, 1] (no normalisation, as the paper).
- Everything random in step t (examples, augmentation, drop path) is drawn from a generator
  seeded by (seed, t), so a run resumed from its last checkpoint continues exactly as an
  uninterrupted run would.
- Checkpoints at steps 0, 1, 2, 4, …, max_steps (:func:`log_spaced_steps`), each with the
  accuracy and loss on fixed clean, poison and validation subsets (the Figure 5 curves).

Estimates (stage ``estimate_convnext``, :func:`estimate_stage`): cost = mean KL from the
checkpoint over ``n_eval`` test images (float32, float64 for the smallest cutoffs; never the
paper's float16: §7.3), prior
N(0, σ²I) with σ = RMS of the initial parameters, naive and Adam-ν preconditioned
(p ∝ 1/(ν^0.5 + ε)). Figure 3: final checkpoint; Figure 5: every checkpoint; Figure 7: the
cutoff sweep. Aggregates and the prior / neighbourhood split are stored for every estimate.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from localvol.cifar import load_prepared
from localvol.records import (
    check_distinct_steps,
    check_stage_settings,
    clear_progress,
    parameter_sha256,
    run_estimate,
    time_cost_call,
)
from localvol.stages import save_npz_atomic, write_json_atomic, write_timings

__all__ = ["ATTO_CONFIG", "ATTO_N_PARAMS", "make_model", "log_spaced_steps", "poison_loss",
           "sample_batch", "augment", "evaluate", "train_run", "train_stage", "load_checkpoint",
           "read_manifest", "estimate_stage"]

# REPLICATION.md §5.2: HF ConvNeXt V2 "Atto" with a 1x1 stem for 32x32 images.
ATTO_CONFIG = dict(patch_size=1, image_size=32, hidden_sizes=[40, 80, 160, 320],
                   depths=[2, 2, 6, 2], drop_path_rate=0.1, num_labels=10)
ATTO_N_PARAMS = 3_388_810
MANIFEST = "manifest.json"


def _quiet_transformers() -> None:
    """No per-file progress bars from save_pretrained / from_pretrained (stage logs stay short)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def make_model(seed: int, **overrides):
    """A freshly initialised ``ConvNextV2ForImageClassification`` (float32) from
    :data:`ATTO_CONFIG` updated with ``overrides`` (e.g. smaller ``hidden_sizes`` in tests);
    ``torch.manual_seed(seed)`` first, so the same seed gives the same initialisation."""
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    torch.manual_seed(seed)
    return ConvNextV2ForImageClassification(ConvNextV2Config(**{**ATTO_CONFIG, **overrides})).float()


def log_spaced_steps(max_steps: int) -> list[int]:
    """Checkpoint steps 0, 1, 2, 4, …, up to ``max_steps`` (included even if not a power of 2).
    Raises ValueError for max_steps < 1."""
    if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    steps, s = [0], 1
    while s < max_steps:
        steps.append(s)
        s *= 2
    return steps + [int(max_steps)]


def poison_loss(logits: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor) -> torch.Tensor:
    """Batch mean of −log p_y (clean examples) and −log(1 − p_y) (poison examples), nats.

    Huang et al. (2020) as in the paper's code (REPLICATION.md §5.2), without its +1e-10: both
    terms are computed from log-softmax (log(1 − p_y) = logsumexp over the other classes − the
    logsumexp over all), so they stay finite at p_y = 0 or 1.

    Args:
        logits: (B, C) float. labels: (B,) int64. is_poison: (B,) bool.
    Returns: scalar tensor (differentiable).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or is_poison.shape != labels.shape:
        raise ValueError(f"need logits (B, C), labels (B,), is_poison (B,); got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(is_poison.shape)}")
    logits = logits.float()
    log_p = torch.log_softmax(logits, -1)
    log_p_y = log_p.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    log_not_y = torch.logsumexp(others, -1) - torch.logsumexp(logits, -1)
    return torch.where(is_poison, -log_not_y, -log_p_y).mean()


# Bump when a change to the training code changes what a run produces: a run folder written
# by another version is started over instead of being resumed or reused.
TRAIN_VERSION = 3

_SAMPLER, _AUGMENT = 0, 1  # independent random streams of a training step


def _step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one training step (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(step), stream]).generate_state(1, np.uint64)[0] >> 1)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(_step_seed(seed, step, _SAMPLER))


def sample_batch(step: int, *, seed: int, batch_size: int, clean_idx: np.ndarray,
                 poison_idx: np.ndarray, poison_probability: float) -> tuple[np.ndarray, np.ndarray]:
    """Training examples of step ``step``: each from the poison split with probability
    ``poison_probability`` (Bernoulli), else the clean split; uniform within its split.
    Depends only on (seed, step). Draws with replacement (the paper's code streamed each split
    in order through ``interleave_datasets``, unseeded). Returns (indices into the training
    set (B,) int64, is_poison (B,) bool). Raises ValueError for a probability outside [0, 1]."""
    if not 0.0 <= poison_probability <= 1.0:
        raise ValueError(f"poison_probability must be in [0, 1], got {poison_probability}")
    g = _step_generator(seed, step)
    is_poison = torch.rand(batch_size, generator=g) < poison_probability
    ci = torch.randint(len(clean_idx), (batch_size,), generator=g).numpy()
    pi = torch.randint(max(len(poison_idx), 1), (batch_size,), generator=g).numpy()
    if is_poison.any() and len(poison_idx) == 0:
        raise ValueError("poison_probability > 0 but the poison split is empty")
    idx = np.where(is_poison.numpy(), poison_idx[pi] if len(poison_idx) else 0, clean_idx[ci])
    return idx.astype(np.int64), is_poison.numpy()


def augment(images: torch.Tensor) -> torch.Tensor:
    """RandAugment → RandomHorizontalFlip → RandomCrop(32, padding=4) → float [0, 1], each
    image independently (torchvision transforms v2; the global torch RNG, which the training
    step seeds). images: (B, 3, 32, 32) uint8. Returns (B, 3, 32, 32) float32."""
    from torchvision.transforms import v2

    t = v2.Compose([v2.RandAugment(), v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=4),
                    v2.ToDtype(torch.float32, scale=True)])
    return torch.stack([t(img) for img in images])


def _to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(images).float().div_(255.0)


@torch.no_grad()
def evaluate(model, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Accuracy and mean cross-entropy (nats) of ``model`` (eval mode, float32) on uint8
    images (n, 3, 32, 32) with labels (n,)."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(images), batch_size):
        x = _to_float(images[i : i + batch_size]).to(device)
        y = torch.as_tensor(labels[i : i + batch_size]).to(device)
        logits = model(x).logits.float()
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return {"accuracy": correct / len(images), "loss": loss / len(images)}


def _decay_groups(model, weight_decay: float) -> list[dict]:
    """The Hugging Face Trainer's grouping: weight decay except on biases and LayerNorms."""
    no_decay = set()
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            no_decay.update(f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False))
    decay, rest = [], []  # (name, parameter) pairs: the state dict keeps the names (adam_moment)
    for name, p in model.named_parameters():
        (rest if name in no_decay or name.endswith("bias") else decay).append((name, p))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


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


def _save_step(run_dir: Path, step: int, model, opt, sched, metrics: dict) -> None:
    """Write step{N}/ beside a temporary name, then rename it (a crash leaves no partial step)."""
    final = run_dir / f"step{step}"
    tmp = run_dir / f".step{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(sched.state_dict(), tmp / "scheduler.pt")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _data_fingerprint(data: dict) -> str:
    """SHA-256 of the training images, labels and split indices (what a run trains on)."""
    h = hashlib.sha256()
    for key in ("train_images", "train_labels", "clean_idx", "poison_idx", "eval_idx"):
        h.update(np.ascontiguousarray(data[key]).tobytes())
    return h.hexdigest()


def train_run(run_dir: str | Path, data: dict, *, poison_probability: float, max_steps: int,
              batch_size: int, lr: float, betas: tuple[float, float], adam_eps: float,
              weight_decay: float, warmup: int, max_grad_norm: float, seed: int, n_curve: int,
              model_overrides: dict | None = None, device: str | None = None,
              progress: bool = True, timings: dict | None = None) -> list[dict]:
    """Train one network (module docstring) and save its log-spaced checkpoints.

    Resumes from the last complete ``step{N}/`` when ``run_dir/config.json`` matches these
    settings, the data (hashed), the device type and :data:`TRAIN_VERSION`; a folder from
    anything else is deleted and the run starts over. The resumed run is bit-identical to an
    uninterrupted one on CPU; on CUDA, cuDNN's backward passes are not deterministic.

    Args:
        run_dir: the run's folder. data: :func:`localvol.cifar.load_prepared`'s dict.
        poison_probability: probability that an example comes from the poison split.
        max_steps: optimizer steps (paper 65,536); batch_size: images per step (paper 128).
        lr, betas, adam_eps, weight_decay: AdamW; warmup: linear warm-up steps, then cosine to 0.
        max_grad_norm: clip the gradient norm to this (the Hugging Face Trainer's default 1.0,
            which the paper's training script used); 0 turns clipping off.
        seed: initialisation and every random draw. n_curve: images per curve subset.
        model_overrides: changes to :data:`ATTO_CONFIG` (tests use a tiny network).
        device: "cuda" / "cpu" (None: CUDA when available).
        timings: optional dict; receives ``step{N}`` → {images_per_s, wall_time_s} for the
            checkpoints this call wrote (wall times stay out of the checkpoints, which DVC
            hashes).

    Returns:
        The history: one dict per checkpoint step with ``step``, ``train_loss`` (mean poison
        loss since the previous checkpoint), ``{clean,poison,val}_{accuracy,loss}`` and
        ``parameter_sha256`` (of the weights saved at that step).
    """
    from transformers import ConvNextV2ForImageClassification, get_cosine_schedule_with_warmup

    _quiet_transformers()
    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = log_spaced_steps(max_steps)
    for name, v in {"batch_size": batch_size, "n_curve": n_curve}.items():
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0 <= warmup <= max_steps:
        raise ValueError(f"warmup must be in [0, max_steps={max_steps}], got {warmup}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not max_grad_norm >= 0:
        raise ValueError(f"max_grad_norm must be ≥ 0 (0: no clipping), got {max_grad_norm}")
    config = {"version": TRAIN_VERSION, "poison_probability": poison_probability,
              "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "betas": list(betas),
              "adam_eps": adam_eps, "weight_decay": weight_decay, "warmup": warmup,
              "max_grad_norm": max_grad_norm, "seed": seed, "n_curve": n_curve,
              "model_overrides": model_overrides or {}, "data_source": data["source"],
              "data_sha256": _data_fingerprint(data), "device_type": device.type}
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

    model = make_model(seed, **(model_overrides or {})).to(device)
    opt = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=adam_eps)
    sched = get_cosine_schedule_with_warmup(opt, warmup, max_steps)
    done = [s for s in steps if (run_dir / f"step{s}" / "metrics.json").exists()]
    start, history = 0, []
    if done:  # resume from the last complete checkpoint
        start = max(done)
        d = run_dir / f"step{start}"
        model = ConvNextV2ForImageClassification.from_pretrained(d).float().to(device)
        opt = torch.optim.AdamW(_decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=adam_eps)
        sched = get_cosine_schedule_with_warmup(opt, warmup, max_steps)
        sched.load_state_dict(torch.load(d / "scheduler.pt"))
        # after the scheduler, whose constructor resets each group's lr to the step-0 value
        opt.load_state_dict(torch.load(d / "optimizer.pt", map_location=device))
        history = [json.loads((run_dir / f"step{s}" / "metrics.json").read_text()) for s in done]
        if progress:
            print(f"{run_dir}: resuming at step {start}", flush=True)
    subsets = _curve_subsets(data, n_curve, seed)
    images = torch.from_numpy(data["train_images"])
    labels = torch.from_numpy(data["train_labels"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    losses, t_last = [], time.perf_counter()
    t_start = t_last
    timings = {} if timings is None else timings
    todo = range(start, max_steps + 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=start, desc=run_dir.name, unit="step")
    for step in todo:
        if step in steps and step not in done:
            now = time.perf_counter()
            n_images = (step - (history[-1]["step"] if history else 0)) * batch_size
            record = {"step": step, "train_loss": float(np.mean(losses)) if losses else None}
            timings[f"step{step}"] = {"images_per_s": n_images / (now - t_last) if n_images else None}
            for name, (x, y) in subsets.items():
                for k, v in evaluate(model, x, y, device=device).items():
                    record[f"{name}_{k}"] = v
            record["parameter_sha256"] = parameter_sha256(model)
            timings[f"step{step}"]["wall_time_s"] = time.perf_counter() - t_start
            _save_step(run_dir, step, model, opt, sched, record)
            history.append(record)
            losses, t_last = [], time.perf_counter()
        if step == max_steps:
            break
        idx, is_poison = sample_batch(step, seed=seed, batch_size=batch_size,
                                      clean_idx=data["clean_idx"], poison_idx=data["poison_idx"],
                                      poison_probability=poison_probability)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            torch.manual_seed(_step_seed(seed, step, _AUGMENT))  # augmentation and drop path
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
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    return history


def train_stage(*, dataset_path: str, checkpoints_dir: str, metrics_path: str, runs: dict,
                max_steps: int, batch_size: int, lr: float, betas: list[float], adam_eps: float,
                weight_decay: float, warmup: int, max_grad_norm: float, seed: int, n_curve: int,
                model_overrides: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the ``train_convnext`` stage: :func:`train_run` for each ``runs`` entry
    (``{name: {"poison_probability": p}}``), then write the manifest and the metrics JSON
    (final accuracies and losses per run). Returns the manifest."""
    if not runs:
        raise ValueError("runs is empty: give e.g. {clean: {poison_probability: 0.0}}")
    data = load_prepared(dataset_path)
    manifest = {"runs": {}, "steps": log_spaced_steps(max_steps), "source": data["source"],
                "seed": seed, "batch_size": batch_size}
    timings: dict[str, Any] = {}
    for name, run in runs.items():
        if set(run) != {"poison_probability"}:
            raise ValueError(f"runs.{name} must have exactly the key poison_probability, got {sorted(run)}")
        history = train_run(Path(checkpoints_dir) / name, data,
                            poison_probability=float(run["poison_probability"]),
                            max_steps=max_steps, batch_size=batch_size, lr=lr, betas=tuple(betas),
                            adam_eps=adam_eps, weight_decay=weight_decay, warmup=warmup,
                            max_grad_norm=max_grad_norm, seed=seed,
                            n_curve=n_curve, model_overrides=model_overrides, progress=progress,
                            timings=timings.setdefault(name, {}))
        # transformers' warm-up starts at lr 0, so the first update changes nothing and step 1
        # holds step 0's weights (as in the paper's Hugging Face Trainer runs): expected, allowed
        first_update_is_zero = [[0, 1]] if warmup > 0 else []
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
    write_timings(metrics_path, timings)
    return manifest


def read_manifest(checkpoints_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoints_dir) / MANIFEST).read_text())


def load_checkpoint(checkpoints_dir: str | Path, run: str, step: int):
    """(model in eval mode, float32, CPU; AdamW state dict or None at step 0) of one checkpoint."""
    from transformers import ConvNextV2ForImageClassification

    _quiet_transformers()
    d = Path(checkpoints_dir) / run / f"step{step}"
    if not d.is_dir():
        raise FileNotFoundError(f"no checkpoint {d}")
    model = ConvNextV2ForImageClassification.from_pretrained(d).float().eval()
    state = torch.load(d / "optimizer.pt", map_location="cpu") if step > 0 else None
    return model, state


def estimate_stage(*, dataset_path: str, checkpoints_dir: str, estimates_path: str,
                   metrics_path: str, samples_path: str, checkpoint_dir: str, n_eval: int,
                   data_batch_size: int, direction_batch_size: int, vectorize: bool,
                   cutoff: float, rtol: float, seed: int, exponent: float, adam_eps: float,
                   k_checkpoints: int, k_histogram: int, cutoffs: list[float], k_cutoffs: int,
                   float64_below: float, progress: bool = True) -> dict[str, Any]:
    """Run the ``estimate_convnext`` stage (module docstring): for each run, naive and Adam ν
    estimates at every checkpoint after step 0 (Figure 5, k_checkpoints), at the final one with
    k_histogram (Figure 3) and across ``cutoffs`` (Figure 7, k_cutoffs). The KL is evaluated in
    float32, except for cutoffs below ``float64_below`` (nats), where a float64 copy of the
    network evaluates it: float32 rounding leaves the KL a few 1e-8 nats of noise (it can even
    come out negative), too close to a cutoff of 1e-6. Writes the estimates JSON, the metrics
    JSON and per-sample NPZ; returns the estimates JSON."""
    import copy

    import localvol

    check_stage_settings(cutoffs=cutoffs, n_eval=n_eval, data_batch_size=data_batch_size,
                         direction_batch_size=direction_batch_size, k_checkpoints=k_checkpoints,
                         k_histogram=k_histogram, k_cutoffs=k_cutoffs)
    if adam_eps < 0:
        raise ValueError(f"adam_eps must be ≥ 0, got {adam_eps}")
    if not float64_below >= 0:
        raise ValueError(f"float64_below must be ≥ 0 (nats), got {float64_below}")
    data = load_prepared(dataset_path)
    if n_eval > len(data["eval_idx"]):
        raise ValueError(f"n_eval {n_eval} > the {len(data['eval_idx'])} evaluation images prepared")
    x = _to_float(data["test_images"][data["eval_idx"][:n_eval]])  # (n_eval, 3, 32, 32)
    manifest = read_manifest(checkpoints_dir)
    steps, runs = manifest["steps"], list(manifest["runs"])
    final = steps[-1]

    model0, _ = load_checkpoint(checkpoints_dir, runs[0], 0)  # the runs share their initialisation
    theta0 = torch.nn.utils.parameters_to_vector(model0.parameters()).detach().double()
    sigma = float(theta0.pow(2).mean().sqrt())
    prior = localvol.GaussianPrior(sigma)
    del model0

    results: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    timings: dict[str, Any] = {}
    t_stage = time.perf_counter()
    kl_time = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # on CUDA, TF32 convolutions would round weights and inputs to a 10-bit mantissa, the
    # fp16 hazard of REPLICATION.md §7.3: the KL is evaluated in true float32 (or float64)
    with _no_tf32():
        for run in runs:
            for step in steps[1:]:
                model, state = load_checkpoint(checkpoints_dir, run, step)
                _verify_weights(model, manifest, run, step)
                model.to(device)
                anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()  # (N,) float32
                nu = localvol.adam_moment(model, state, order=2).float()  # on the model's device
                cost = localvol.ExpectedKL(model, x, batch_size=data_batch_size, vectorize=vectorize)
                if kl_time is None:
                    kl_time = time_cost_call(cost, anchor[None])
                base = {"run": run, "step": step, "anchor_rms": float(anchor.double().pow(2).mean().sqrt())}

                precise = {}  # float64 cost, anchor and ν, built on first use

                def go(key, *, k, cut, adam, eps=adam_eps, figure):
                    series = f"{run}, " + (f"Adam ν ε={eps:g}" if adam else "naive")
                    c, a, v = cost, anchor, nu
                    if cut < float64_below:
                        if not precise:
                            m64 = copy.deepcopy(model).double()
                            precise.update(cost=localvol.ExpectedKL(
                                m64, x.double(), batch_size=data_batch_size, vectorize=vectorize),
                                anchor=anchor.double(), nu=nu.double())
                        c, a, v = precise["cost"], precise["anchor"], precise["nu"]
                    rec, arr = run_estimate(
                        c, a, prior=prior, cutoff=cut, n_samples=k, nu=v if adam else None,
                        eps=eps if adam else None, exponent=exponent, rtol=rtol, seed=seed,
                        batch_size=direction_batch_size, progress_dir=checkpoint_dir, key=key,
                        salt=(data["source"], n_eval, vectorize, str(device)), timings=timings,
                        meta={**base, "series": series, "figure": figure,
                              "dtype": str(a.dtype).removeprefix("torch.")}, progress=progress)
                    results[key] = rec
                    arrays.update(arr)

                for adam in (False, True):
                    tag = "adam" if adam else "naive"
                    go(f"ckpt_{run}_{tag}_step{step}", k=k_checkpoints, cut=cutoff, adam=adam, figure=5)
                    if step == final:
                        go(f"hist_{run}_{tag}", k=k_histogram, cut=cutoff, adam=adam, figure=3)
                        for i, cut in enumerate(cutoffs):
                            go(f"cutoff_{run}_{tag}_{i}", k=k_cutoffs, cut=cut, adam=adam, figure=7)

    summary = {
        "config": {"source": manifest["source"], "runs": manifest["runs"], "steps": steps,
                   "n_params": manifest["n_params"], "sigma": sigma, "cutoff": cutoff,
                   "rtol": rtol, "seed": seed, "exponent": exponent, "adam_eps": adam_eps,
                   "k_checkpoints": k_checkpoints, "k_histogram": k_histogram,
                   "k_cutoffs": k_cutoffs, "cutoffs": cutoffs, "n_eval": n_eval,
                   "data_batch_size": data_batch_size,
                   "direction_batch_size": direction_batch_size,
                   "dtype": f"float32 (float64 for cutoffs below {float64_below:g})",
                   "float64_below": float64_below, "device": str(device), "tf32": False},
        "estimates": results,
    }
    write_json_atomic(estimates_path, summary)
    save_npz_atomic(samples_path, **arrays)
    write_json_atomic(metrics_path, metrics_from_summary(summary))
    write_timings(estimates_path, {"kl_evaluation_s": kl_time, "estimates": timings,
                                   "wall_time_s": time.perf_counter() - t_stage})
    clear_progress(checkpoint_dir)
    return summary


def _verify_weights(model, manifest: dict, run: str, step: int) -> None:
    """The loaded weights must be those train_convnext saved at this step (manifest hash)."""
    history = {h["step"]: h for h in manifest["runs"][run]["history"]}
    recorded = history.get(step, {}).get("parameter_sha256")
    if recorded is None:
        raise ValueError(f"the manifest has no parameter hash for {run} step {step}: checkpoints "
                         "from an older train_convnext; rerun it (dvc repro -f train_convnext)")
    digest = parameter_sha256(model)
    if digest != recorded:
        raise ValueError(f"{run}/step{step}/ holds other weights than train_convnext recorded "
                         f"(SHA-256 {digest[:12]} vs {recorded[:12]})")


@contextlib.contextmanager
def _no_tf32():
    """Turn off TF32 in cuDNN convolutions and CUDA matmuls inside the block (restored after)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def metrics_from_summary(summary: dict) -> dict[str, Any]:
    """Headline numbers for DVC: the four Figure 3 aggregates (with their prior and
    neighbourhood terms), the final accuracies, and whether the poisoned volume is smaller."""
    est, cfg = summary["estimates"], summary["config"]
    out: dict[str, Any] = {"sigma": cfg["sigma"], "data_source": cfg["source"]}
    for run, r in cfg["runs"].items():
        last = r["history"][-1]
        out[f"{run}_val_accuracy"] = last.get("val_accuracy")
        out[f"{run}_poison_accuracy"] = last.get("poison_accuracy")
        for tag in ("naive", "adam"):
            rec = est.get(f"hist_{run}_{tag}")
            if rec:
                out[f"{run}_{tag}"] = {k: rec[k] for k in (
                    "log10_volume", "log10_prior_at_anchor", "log10_neighbourhood")}
    if "clean_naive" in out and "poisoned_naive" in out:
        for tag in ("naive", "adam"):
            out[f"poisoned_smaller_{tag}"] = bool(
                out[f"poisoned_{tag}"]["log10_volume"] < out[f"clean_{tag}"]["log10_volume"])
    return out
