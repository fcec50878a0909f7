"""Data poisoning as the paper's ConvNeXt experiment did it (Huang et al. 2020), shared by the
ConvNeXt (:mod:`replication.convnext`) and digits (:mod:`replication.poison_digits`) experiments.

- :func:`sample_batch`: each example of a step's batch comes from the poison split with
  probability ``poison_probability`` (a seeded Bernoulli draw per example; uniform index within
  the split, with replacement), else from the clean split.
- :func:`poison_loss`: −log p_y for clean, −log(1 − p_y) for poison examples, batch mean.
- :func:`step_seed`: every random stream of training step t is seeded by (seed, t, stream), so
  a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SAMPLER", "poison_loss", "step_seed", "sample_batch"]

SAMPLER = 0  # the batch-drawing random stream of a training step (replication.convnext: AUGMENT = 1)


def poison_loss(logits: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor) -> torch.Tensor:
    """Batch mean of −log p_y (clean examples) and −log(1 − p_y) (poison examples), nats.

    Huang et al. (2020) as in the paper's code (docs/experiments.md#convnext), without its
    +1e-10: both terms are computed from log-softmax (log(1 − p_y) = logsumexp over the other
    classes − the logsumexp over all), so they stay finite at p_y = 0 or 1.

    Args:
        logits: (B, C) float. labels: (B,) int64. is_poison: (B,) bool.
    Returns: scalar float32 tensor (differentiable).
    Raises: ValueError for other shapes.
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


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for one random stream (:data:`SAMPLER`, ``replication.convnext.model.AUGMENT``) of one training
    step (numpy SeedSequence of (seed, step, stream))."""
    return int(np.random.SeedSequence([int(seed), int(step), stream]).generate_state(1, np.uint64)[0] >> 1)


def sample_batch(step: int, *, seed: int, batch_size: int, clean_idx: np.ndarray,
                 poison_idx: np.ndarray, poison_probability: float,
                 key: str = "poison_probability") -> tuple[np.ndarray, np.ndarray]:
    """Training examples of step ``step``: each from the poison split with probability
    ``poison_probability`` (Bernoulli), else the clean split; uniform within its split.

    Depends only on (seed, step). Draws with replacement (the paper's code streamed each split
    in order through ``interleave_datasets``, unseeded).

    Returns:
        (indices into the training set (B,) int64, is_poison (B,) bool).
    Raises:
        ValueError for a probability outside [0, 1] (the message names ``key``, the
        params.yaml key that set it), or a positive one with an empty poison split.
    """
    if not 0.0 <= poison_probability <= 1.0:
        raise ValueError(f"poison_probability must be in [0, 1], got {poison_probability} ({key})")
    g = torch.Generator().manual_seed(step_seed(seed, step, SAMPLER))
    is_poison = torch.rand(batch_size, generator=g) < poison_probability
    ci = torch.randint(len(clean_idx), (batch_size,), generator=g).numpy()
    pi = torch.randint(max(len(poison_idx), 1), (batch_size,), generator=g).numpy()
    if is_poison.any() and len(poison_idx) == 0:
        raise ValueError("poison_probability > 0 but the poison split is empty")
    idx = np.where(is_poison.numpy(), poison_idx[pi] if len(poison_idx) else 0, clean_idx[ci])
    return idx.astype(np.int64), is_poison.numpy()
