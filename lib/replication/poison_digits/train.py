"""Clean and poisoned digits MLPs (stage ``train_poison_digits``; docs/experiments.md#poisoned-digits).

The split's 1,024 training images are divided once (``numpy.random.default_rng(split_seed)``
permutation): the first ``n_poison`` form the poison split, the rest the clean split. The 773
held-out images stay the KL cost's evaluation data.

Every network follows Figure 1's recipe (:mod:`replication.mlp.model`): the 64 → 64 → 10 GELU
MLP initialised N(0, 1/fan_in), Adam with cosine decay to 0, loss + ½·l2·|θ|². What differs is
the batches and the loss, as in the ConvNeXt experiment (:mod:`replication.poisoning`):
each example of a step's batch comes from the poison split with probability
``poison_probability`` (a seeded Bernoulli draw, uniform with replacement within the split),
and poison examples contribute −log(1 − p_y) (Huang et al. 2020) instead of −log p_y. A
``clean`` network has poison probability 0 (it never sees the poison split); a ``poisoned`` one
the given probability. Seed s initialises both conditions' network s alike and draws their
batches, so the two conditions are paired by seed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from replication.poisoning import poison_loss, sample_batch
from replication.mlp.data import N_CLASSES, load_split_data
from replication.mlp.model import (TrainResult, build_mlp, count_parameters, evaluate, init_mlp_,
                                   save_trained, _check_training, _cosine_decay)
from replication.pipeline.files import write_csv_atomic, write_json_atomic, write_timings

__all__ = ["CONDITIONS", "network_name", "poison_split", "train_network", "train_stage"]

CONDITIONS = ("clean", "poisoned")


def network_name(condition: str, seed: int) -> str:
    """Folder and record name of one network, e.g. ``"poisoned-seed3"``."""
    return f"{condition}-seed{seed}"


def poison_split(n_train: int, n_poison: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean indices, poison indices) into the training images: the first ``n_poison`` of
    ``default_rng(seed).permutation(n_train)`` are poison, each part sorted.

    Raises ValueError (naming ``train_poison_digits.n_poison``) unless 1 ≤ n_poison < n_train."""
    if isinstance(n_poison, bool) or int(n_poison) != n_poison or not 1 <= n_poison < n_train:
        raise ValueError(f"train_poison_digits.n_poison must be an integer in [1, {n_train}), "
                         f"got {n_poison!r}")
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[n_poison:]), np.sort(order[:n_poison])


def train_network(images: np.ndarray, labels: np.ndarray, clean_idx: np.ndarray,
                  poison_idx: np.ndarray, *, poison_probability: float, seed: int, hidden: int,
                  lr: float, steps: int, batch_size: int, l2: float, betas, adam_eps: float
                  ) -> TrainResult:
    """Train one network (see the module docstring) on ``images`` (n, 64) float32 and
    ``labels`` (n,) int64, the training images; ``clean_idx`` and ``poison_idx`` index them.

    The batch of step t is :func:`replication.poisoning.sample_batch` (t, seed); the loss
    :func:`replication.poisoning.poison_loss` + ½·l2·|θ|² (nats); the learning rate decays
    from ``lr`` to 0 over ``steps``. Returns a :class:`replication.mlp.model.TrainResult` with
    an empty history and no metrics (:func:`train_stage` measures them). Raises ValueError
    naming the ``train_poison_digits`` key of a bad setting."""
    _check_training(hidden, lr, steps, batch_size, l2, betas, adam_eps,
                    section="train_poison_digits", epochs_key="steps")
    if not 0.0 <= poison_probability < 1.0:
        raise ValueError(f"train_poison_digits.poison_probability must be in [0, 1), "
                         f"got {poison_probability!r}")
    model = init_mlp_(build_mlp(images.shape[1], hidden, N_CLASSES),
                      torch.Generator().manual_seed(seed))
    x, y = torch.as_tensor(images), torch.as_tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), eps=adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_decay(steps))
    t0 = time.perf_counter()
    for step in range(steps):
        idx, is_poison = sample_batch(step, seed=seed, batch_size=batch_size, clean_idx=clean_idx,
                                      poison_idx=poison_idx, poison_probability=poison_probability)
        idx = torch.as_tensor(idx)
        loss = poison_loss(model(x[idx]), y[idx], torch.as_tensor(is_poison))
        loss = loss + 0.5 * l2 * sum((p * p).sum() for p in model.parameters())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return TrainResult(model=model, optimizer=optimizer, history=[], metrics={},
                       wall_time_s=time.perf_counter() - t0)


def train_stage(*, data_dir: str, split_path: str, models_dir: str, metrics_path: str,
                table_path: str, split_seed: int, n_poison: int, poison_probability: float,
                seeds: list[int], hidden: int, lr: float, steps: int, batch_size: int, l2: float,
                betas: list[float], adam_eps: float, progress: bool = True) -> list[dict]:
    """The ``train_poison_digits`` stage: for each condition (:data:`CONDITIONS`) and seed, train
    a network and save it under ``models_dir/<condition>-seed<s>/`` (weights, Adam state,
    architecture: :func:`replication.mlp.model.save_trained`); write one row per network to
    ``table_path`` (CSV) and the metrics JSON (``{name: row}``; rows: condition, seed,
    poison_probability, train (clean split), poison-split and held-out accuracy and loss, the
    parameter norm). Accuracies on the poison split use its true labels: a poisoned network is
    trained to get them wrong. Wall times go to the metrics' ``*.timings.json``.

    Raises ValueError naming the ``train_poison_digits`` key of a bad setting, before training.
    """
    seeds = list(seeds)
    if (not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise ValueError(f"train_poison_digits.seeds must be distinct integers ≥ 0, got {seeds!r}")
    if not 0.0 < poison_probability < 1.0:  # 0 would make every poisoned network a clean one
        raise ValueError(f"train_poison_digits.poison_probability must be in (0, 1), "
                         f"got {poison_probability!r}")
    _check_training(hidden, lr, steps, batch_size, l2, betas, adam_eps,
                    section="train_poison_digits", epochs_key="steps")
    data = load_split_data(data_dir, split_path)
    images, labels = data["train_images"], data["train_labels"]
    clean_idx, poison_idx = poison_split(len(images), n_poison, split_seed)
    subsets = {"train": (images[clean_idx], labels[clean_idx]),
               "poison": (images[poison_idx], labels[poison_idx]),
               "heldout": (data["heldout_images"], data["heldout_labels"])}
    rows, timings = [], {}
    for condition in CONDITIONS:
        p = 0.0 if condition == "clean" else poison_probability
        for seed in seeds:
            name = network_name(condition, seed)
            result = train_network(images, labels, clean_idx, poison_idx, poison_probability=p,
                                   seed=seed, hidden=hidden, lr=lr, steps=steps,
                                   batch_size=batch_size, l2=l2, betas=betas, adam_eps=adam_eps)
            save_trained(Path(models_dir) / name, result)
            row = {"network": name, "condition": condition, "seed": seed, "poison_probability": p}
            for split, (x, y) in subsets.items():
                measured = evaluate(result.model, torch.as_tensor(x), torch.as_tensor(y))
                row.update({f"{split}_{k}": v for k, v in measured.items()})
            norm = math.sqrt(sum(float((q.detach().double() ** 2).sum())
                                 for q in result.model.parameters()))
            row.update({"param_norm": norm, "n_parameters": count_parameters(result.model)})
            rows.append(row)
            timings[name] = result.wall_time_s
            if progress:
                print(f"{name}: held-out accuracy {row['heldout_accuracy']:.3f}, poison-split "
                      f"accuracy {row['poison_accuracy']:.3f}, |θ| {norm:.2f}", flush=True)
    write_csv_atomic(table_path, rows)
    write_json_atomic(metrics_path, {r["network"]: {k: v for k, v in r.items() if k != "network"}
                                     for r in rows})
    write_timings(metrics_path, timings)
    return rows
