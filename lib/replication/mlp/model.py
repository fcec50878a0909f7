"""The paper's digits MLP: model, training, saving (docs/experiments.md#figure-1).

Model: 64 → hidden → 10, GELU (tanh approximation, flax's default) between the two layers;
weights and biases initialised N(0, 1/fan_in). With hidden = 64: D = 64·64 + 64 + 64·10 + 10
= 4,810 parameters.

Training: Adam (β 0.9/0.999, ε 1e-8, no decoupled weight decay), lr cosine-decayed to 0 over all
steps, loss = mean cross-entropy + ½·l2·|θ|² (all parameters, biases included), as the paper's
code did. The saved Adam state supplies two of Figure 1's preconditioners (μ and ν).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from replication.mlp.data import N_CLASSES, N_PIXELS, load_split_data
from replication.pipeline.files import atomic_path, write_csv_atomic, write_json_atomic, write_timings
from replication.sweep import check_counts

__all__ = [
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "CONFIG_FILE",
    "build_mlp",
    "init_mlp_",
    "count_parameters",
    "TrainResult",
    "evaluate",
    "train_mlp",
    "save_trained",
    "load_trained",
    "train_stage",
]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "model_config.json"


def build_mlp(n_in: int = N_PIXELS, hidden: int = 64, n_out: int = N_CLASSES) -> nn.Sequential:
    """64 → hidden → 10 MLP with tanh-approximated GELU (flax's default GELU).

    An ``nn.Sequential`` of Linear + elementwise activation, as ``localvol.hesscale_diagonal``
    requires. Parameters are left at torch's default init; call :func:`init_mlp_`.
    """
    return nn.Sequential(
        nn.Linear(n_in, hidden),  # (B, 64) -> (B, hidden)
        nn.GELU(approximate="tanh"),
        nn.Linear(hidden, n_out),  # (B, hidden) -> (B, 10) logits
    )


@torch.no_grad()
def init_mlp_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Weights and biases of every Linear ~ N(0, 1/fan_in), untruncated (as the paper's flax MLP)."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            std = 1.0 / math.sqrt(layer.in_features)
            layer.weight.normal_(0.0, std, generator=generator)
            layer.bias.normal_(0.0, std, generator=generator)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters N (the dimension of θ)."""
    return sum(p.numel() for p in model.parameters())


@dataclasses.dataclass
class TrainResult:
    """A trained MLP (eval mode), its Adam optimizer, one history row per epoch (epoch, step,
    lr, train_objective, train/heldout loss and accuracy), the final metrics (no wall time) and
    the training wall time in seconds."""

    model: nn.Sequential
    optimizer: torch.optim.Adam
    history: list[dict]
    metrics: dict
    wall_time_s: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean cross-entropy (nats, no L2 term) and accuracy of ``model`` on (images (n, 64),
    labels (n,))."""
    logits = model(images)  # (n, 10)
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).double().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def _cosine_decay(total_steps: int):
    """optax.cosine_decay_schedule(init, total_steps) as a LambdaLR factor: ½(1 + cos(π t/T))."""

    def factor(step: int) -> float:
        t = min(step, total_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t / total_steps))

    return factor


def _check_training(hidden, lr, epochs, batch_size, l2, betas, adam_eps, *,
                    section: str = "train_mlp", epochs_key: str = "epochs") -> None:
    """ValueError naming ``{section}.{key}`` for a bad training setting (``epochs`` is named
    ``epochs_key``: a stage that counts steps says so)."""
    check_counts(**{f"{section}.hidden": hidden, f"{section}.{epochs_key}": epochs,
                    f"{section}.batch_size": batch_size})
    if not lr > 0:
        raise ValueError(f"{section}.lr must be > 0, got {lr!r}")
    if not l2 >= 0:
        raise ValueError(f"{section}.l2 must be ≥ 0, got {l2!r}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{section}.betas must be two numbers in [0, 1), got {betas!r}")
    if not adam_eps > 0:
        raise ValueError(f"{section}.adam_eps must be > 0, got {adam_eps!r}")


def _run_epoch(model, optimizer, schedule, x, y, order, batch_size, l2) -> float:
    """One pass over ``order``; returns the summed objective (mean CE + ½·l2·|θ|² per batch,
    times the batch size)."""
    total = 0.0
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        logits = model(x[idx])  # (b, 10)
        ce = nn.functional.cross_entropy(logits, y[idx])
        sq_norm = sum((p * p).sum() for p in model.parameters())
        loss = ce + 0.5 * l2 * sq_norm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item() * len(idx)
    return total


def train_mlp(train_images: np.ndarray, train_labels: np.ndarray, heldout_images: np.ndarray,
              heldout_labels: np.ndarray, *, hidden: int = 64, lr: float = 0.05, epochs: int = 25,
              batch_size: int = 64, l2: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999),
              adam_eps: float = 1e-8, seed: int = 0) -> TrainResult:
    """Train the digits MLP as the paper's code did (docs/experiments.md#figure-1).

    Images (n, 64) float32 in [0, 1], labels (n,) int64. There are ``ceil(n_train /
    batch_size)`` steps per epoch (the last batch may be smaller; 1024 / 64 = 16 exactly), each
    epoch a fresh permutation drawn from ``default_rng([seed, epoch])``. The learning rate
    follows a cosine decay from ``lr`` to 0 over all ``epochs · steps_per_epoch`` steps. Loss =
    mean CE + ½·l2·|θ|² (nats). Raises ValueError naming the ``train_mlp`` key of a bad setting.
    """
    _check_training(hidden, lr, epochs, batch_size, l2, betas, adam_eps)
    torch.manual_seed(seed)
    model = init_mlp_(build_mlp(train_images.shape[1], hidden, N_CLASSES),
                      torch.Generator().manual_seed(seed))
    splits = {"train": (torch.as_tensor(train_images, dtype=torch.float32),
                        torch.as_tensor(train_labels, dtype=torch.int64)),
              "heldout": (torch.as_tensor(heldout_images, dtype=torch.float32),
                          torch.as_tensor(heldout_labels, dtype=torch.int64))}
    x_train, y_train = splits["train"]
    n = len(x_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), eps=adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_decay(epochs * math.ceil(n / batch_size)))
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(n))
        total = _run_epoch(model, optimizer, schedule, x_train, y_train, order, batch_size, l2)
        model.eval()
        row = {"epoch": epoch + 1, "step": schedule.last_epoch, "lr": schedule.get_last_lr()[0],
               "train_objective": total / n}  # mean CE + L2 term, running over the epoch
        for split, (x, y) in splits.items():
            row.update({f"{split}_{k}": v for k, v in evaluate(model, x, y).items()})
        history.append(row)
        model.train()
    model.eval()
    last = history[-1]
    metrics = {**{k: last[k] for k in ("train_accuracy", "train_loss", "heldout_accuracy",
                                       "heldout_loss")},
               "n_parameters": count_parameters(model), "steps": last["step"],
               "param_norm": float(torch.sqrt(sum((p.detach() ** 2).sum()
                                                  for p in model.parameters())))}
    return TrainResult(model=model, optimizer=optimizer, history=history, metrics=metrics,
                       wall_time_s=time.perf_counter() - t0)


def save_trained(out_dir: str | Path, result: TrainResult) -> dict[str, Path]:
    """Write weights (safetensors), Adam state (torch.save of ``optimizer.state_dict()``) and the
    architecture (JSON) into ``out_dir``, each atomically. Returns the paths by kind."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = result.model
    paths = {"model": out_dir / MODEL_FILE, "optimizer": out_dir / OPTIMIZER_FILE,
             "config": out_dir / CONFIG_FILE}
    with atomic_path(paths["model"]) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    # through a file object: torch.save names the archive's records after a path it is given,
    # and the temporary path is random, so the bytes (and DVC's hash) would change every run
    with atomic_path(paths["optimizer"]) as tmp, open(tmp, "wb") as f:
        torch.save(result.optimizer.state_dict(), f)
    config = {"n_in": model[0].in_features, "hidden": model[0].out_features,
              "n_out": model[2].out_features, "activation": "gelu_tanh"}
    write_json_atomic(paths["config"], config)
    return paths


def load_trained(model_dir: str | Path) -> tuple[nn.Sequential, dict]:
    """Load the MLP and its Adam ``state_dict`` written by :func:`save_trained`.

    Returns (model in eval mode, float32 on CPU; optimizer_state_dict)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    model = build_mlp(config["n_in"], config["hidden"], config["n_out"])
    model.load_state_dict(load_file(str(model_dir / MODEL_FILE)))
    model.eval()
    optimizer_state = torch.load(model_dir / OPTIMIZER_FILE, weights_only=True)
    return model, optimizer_state


def train_stage(*, data_dir: str, split_path: str, model_dir: str, metrics_path: str,
                history_path: str, seed: int, hidden: int, lr: float, epochs: int,
                batch_size: int, l2: float, betas: list[float], adam_eps: float) -> TrainResult:
    """The ``train_mlp`` stage: train on the split's training images, then save the weights,
    the Adam state and the architecture (``model_dir``), the final metrics (JSON, a DVC
    metrics file; the wall time goes to its ``*.timings.json``) and the per-epoch history
    (CSV)."""
    data = load_split_data(data_dir, split_path)
    result = train_mlp(data["train_images"], data["train_labels"], data["heldout_images"],
                       data["heldout_labels"], hidden=hidden, lr=lr, epochs=epochs,
                       batch_size=batch_size, l2=l2, betas=tuple(betas), adam_eps=adam_eps,
                       seed=seed)
    save_trained(model_dir, result)
    write_json_atomic(metrics_path, result.metrics)
    write_timings(metrics_path, {"wall_time_s": result.wall_time_s})
    write_csv_atomic(history_path, result.history)
    return result
