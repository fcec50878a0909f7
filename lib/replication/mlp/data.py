"""UCI digits data and the paper's one-hidden-layer MLP (Figure 1; REPLICATION.md §5.1).

Data: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" test
set (Alpaydin & Kaynak 1998): 1,797 images of 8×8 pixels with integer values 0..16, stored as
``digits.csv.gz`` (64 pixel columns, then the label). :func:`write_raw_data` copies that file
byte for byte into ``data/`` so that ``data.dvc`` hashes the same bytes on every machine.

Model: 64 → hidden → 10, GELU (tanh approximation, flax's default) between the two layers;
weights and biases initialised N(0, 1/fan_in). With hidden = 64: D = 64·64 + 64 + 64·10 + 10
= 4,810 parameters.

Training: Adam (β 0.9/0.999, ε 1e-8, no decoupled weight decay), lr cosine-decayed to 0 over all
steps, loss = mean cross-entropy + ½·l2·|θ|² (all parameters, biases included), as the paper's
code did.

Command line (used by ``make data``)::

    python -m localvol.digits write-data data/digits
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "DIGITS_FILE",
    "DIGITS_SHA256",
    "N_DIGITS",
    "write_raw_data",
    "load_digits",
    "split_indices",
    "save_split",
    "load_split",
    "build_mlp",
    "init_mlp_",
    "count_parameters",
    "TrainResult",
    "train_mlp",
    "evaluate",
    "save_trained",
    "load_trained",
    "split_stage",
    "train_stage",
]

DIGITS_FILE = "digits.csv.gz"
# sha256 of sklearn/datasets/data/digits.csv.gz as shipped by the pinned scikit-learn.
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
N_DIGITS = 1797
N_PIXELS = 64
N_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Raw data
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sklearn_digits_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("sklearn.datasets") / "data" / DIGITS_FILE))


def write_raw_data(out_dir: str | Path) -> Path:
    """Copy scikit-learn's bundled ``digits.csv.gz`` into ``out_dir`` byte for byte.

    Idempotent: an existing file with the right checksum is left alone; a file with the wrong
    checksum is an error (never silently overwritten). Returns the written path.
    """
    out_dir = Path(out_dir)
    target = out_dir / DIGITS_FILE
    if target.exists():
        if _sha256(target) != DIGITS_SHA256:
            raise RuntimeError(
                f"{target} exists but its sha256 is not the expected {DIGITS_SHA256}; "
                "remove it (or run `dvc checkout data.dvc`) and retry"
            )
        return target
    source = _sklearn_digits_path()
    if _sha256(source) != DIGITS_SHA256:
        raise RuntimeError(
            f"scikit-learn's bundled {source} has an unexpected sha256; "
            "install the pinned scikit-learn (see pyproject.toml)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def load_digits(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``data_dir/digits.csv.gz``.

    Returns
    -------
    images : (1797, 64) float32, pixel values / 16, so in [0, 1]
    labels : (1797,) int64 in 0..9
    """
    path = Path(data_dir) / DIGITS_FILE
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # (1797, 65): 64 pixels (0..16), label
    if table.shape != (N_DIGITS, N_PIXELS + 1):
        raise ValueError(f"{path}: expected shape {(N_DIGITS, N_PIXELS + 1)}, got {table.shape}")
    images = (table[:, :N_PIXELS] / 16.0).astype(np.float32)
    labels = table[:, N_PIXELS].astype(np.int64)
    return images, labels


def split_indices(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)``: the first ``n_train`` of one permutation train,
    the rest held out (the paper's code used a JAX permutation with key 0; this one is
    ``numpy.random.default_rng(seed).permutation(n)``).

    Returns (train_idx (n_train,), heldout_idx (n - n_train,)), both int64.
    """
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be in (0, {n}), got {n_train}")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return perm[:n_train], perm[n_train:]


def save_split(path: str | Path, train_idx: np.ndarray, heldout_idx: np.ndarray, seed: int) -> None:
    from localvol.stages import save_npz_atomic

    save_npz_atomic(path, train_idx=train_idx, heldout_idx=heldout_idx, seed=np.int64(seed))


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train_idx, heldout_idx) saved by :func:`save_split`."""
    with np.load(path) as z:
        return z["train_idx"], z["heldout_idx"]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


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
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    model: nn.Sequential
    optimizer: torch.optim.Adam
    history: list[dict]  # one row per epoch: epoch, step, lr, train_loss (running mean), ...
    metrics: dict  # final train/held-out accuracy and loss, n_parameters, ... (no wall time)
    wall_time_s: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean cross-entropy (nats, no L2 term) and accuracy of ``model`` on (images, labels)."""
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


def train_mlp(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    heldout_images: np.ndarray,
    heldout_labels: np.ndarray,
    *,
    hidden: int = 64,
    lr: float = 0.05,
    epochs: int = 25,
    batch_size: int = 64,
    l2: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    seed: int = 0,
) -> TrainResult:
    """Train the digits MLP as the paper's code did (REPLICATION.md §5.1).

    There are ``ceil(n_train / batch_size)`` steps per epoch (the last batch may be
    smaller; 1024 / 64 = 16 exactly), each epoch a fresh permutation drawn from
    ``default_rng([seed, epoch])``. The learning rate follows a cosine decay from ``lr`` to 0
    over all ``epochs · steps_per_epoch`` steps. Loss = mean CE + ½·l2·|θ|².
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = init_mlp_(build_mlp(train_images.shape[1], hidden, N_CLASSES), gen)
    x_train = torch.as_tensor(train_images, dtype=torch.float32)
    y_train = torch.as_tensor(train_labels, dtype=torch.int64)
    x_held = torch.as_tensor(heldout_images, dtype=torch.float32)
    y_held = torch.as_tensor(heldout_labels, dtype=torch.int64)

    n = len(x_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), eps=adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_decay(total_steps))

    history = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(n))
        running = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            logits = model(x_train[idx])  # (b, 10)
            ce = nn.functional.cross_entropy(logits, y_train[idx])
            sq_norm = sum((p * p).sum() for p in model.parameters())
            loss = ce + 0.5 * l2 * sq_norm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running += loss.item() * len(idx)
        model.eval()
        row = {"epoch": epoch + 1, "step": step, "lr": schedule.get_last_lr()[0]}
        row["train_objective"] = running / n  # mean CE + L2 term, running over the epoch
        for split, (x, y) in {"train": (x_train, y_train), "heldout": (x_held, y_held)}.items():
            for key, value in evaluate(model, x, y).items():
                row[f"{split}_{key}"] = value
        history.append(row)
        model.train()
    model.eval()

    last = history[-1]
    metrics = {
        "train_accuracy": last["train_accuracy"],
        "train_loss": last["train_loss"],
        "heldout_accuracy": last["heldout_accuracy"],
        "heldout_loss": last["heldout_loss"],
        "n_parameters": count_parameters(model),
        "steps": step,
        "param_norm": float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters()))),
    }
    return TrainResult(model=model, optimizer=optimizer, history=history, metrics=metrics,
                       wall_time_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Saving and loading a trained model
# ---------------------------------------------------------------------------------------------

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
CONFIG_FILE = "model_config.json"


def save_trained(out_dir: str | Path, result: TrainResult) -> dict[str, Path]:
    """Write weights (safetensors), Adam state (torch.save of ``optimizer.state_dict()``) and the
    architecture (JSON) into ``out_dir``, each atomically. Returns the paths by kind."""
    from safetensors.torch import save_file

    from localvol.stages import atomic_path, write_json_atomic

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

    Returns (model in eval mode, optimizer_state_dict)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    model = build_mlp(config["n_in"], config["hidden"], config["n_out"])
    model.load_state_dict(load_file(str(model_dir / MODEL_FILE)))
    model.eval()
    optimizer_state = torch.load(model_dir / OPTIMIZER_FILE, weights_only=True)
    return model, optimizer_state


# ---------------------------------------------------------------------------------------------
# Stages (plain functions; the notebooks call them with their validated parameters)
# ---------------------------------------------------------------------------------------------


def split_stage(*, data_dir: str, split_path: str, seed: int, n_train: int) -> dict:
    """The ``split_digits`` stage: write the seeded train/held-out indices to ``split_path``.

    Returns a summary: sizes and per-class counts of each split."""
    images, labels = load_digits(data_dir)
    train_idx, heldout_idx = split_indices(len(images), n_train, seed)
    save_split(split_path, train_idx, heldout_idx, seed)
    counts = {name: np.bincount(labels[idx], minlength=N_CLASSES).tolist()
              for name, idx in (("train", train_idx), ("heldout", heldout_idx))}
    return {"n_images": len(images), "n_train": len(train_idx), "n_heldout": len(heldout_idx),
            "class_counts": counts}


def train_stage(*, data_dir: str, split_path: str, model_dir: str, metrics_path: str,
                history_path: str, seed: int, hidden: int, lr: float, epochs: int,
                batch_size: int, l2: float, betas: list[float], adam_eps: float) -> TrainResult:
    """The ``train_mlp`` stage: train on the split's training images, then save the weights,
    the Adam state and the architecture (``model_dir``), the final metrics (JSON, a DVC
    metrics file) and the per-epoch history (CSV)."""
    import pandas as pd

    from localvol.stages import atomic_path, write_json_atomic, write_timings

    images, labels = load_digits(data_dir)
    train_idx, heldout_idx = load_split(split_path)
    result = train_mlp(images[train_idx], labels[train_idx], images[heldout_idx],
                       labels[heldout_idx], hidden=hidden, lr=lr, epochs=epochs,
                       batch_size=batch_size, l2=l2, betas=tuple(betas), adam_eps=adam_eps,
                       seed=seed)
    save_trained(model_dir, result)
    write_json_atomic(metrics_path, result.metrics)
    write_timings(metrics_path, {"wall_time_s": result.wall_time_s})
    with atomic_path(history_path) as tmp:
        pd.DataFrame(result.history).to_csv(tmp, index=False, float_format="%.8g")
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m localvol.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-data", help="copy scikit-learn's bundled digits.csv.gz")
    write.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write-data":
        print(write_raw_data(args.out_dir))


if __name__ == "__main__":
    main()
