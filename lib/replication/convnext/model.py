"""The network and what one training step draws (paper §4.2; docs/experiments.md#convnext).

- Model: ``ConvNextV2ForImageClassification`` with :data:`ATTO_CONFIG` (3,388,810 parameters).
- AdamW parameter groups as the Hugging Face Trainer the paper used (:func:`decay_groups`).
- Each example of a batch comes from the poison split with probability ``poison_probability``
  (a seeded Bernoulli draw per example; uniform index within the split), else from the clean
  split (Huang et al. 2020 as in the paper's code, whose interleaving was unseeded). Loss
  (:func:`poison_loss`): −log p_y for clean, −log(1 − p_y) for poison examples, batch mean.
- Augmentation (torchvision transforms v2): RandAugment → horizontal flip → random crop 32,
  padding 4 → float in [0, 1] (no normalisation, as the paper).
- Everything random in step t is drawn from streams seeded by (seed, t, stream)
  (:func:`step_seed`), so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from replication.poisoning import SAMPLER, poison_loss, sample_batch, step_seed

__all__ = ["ATTO_CONFIG", "ATTO_N_PARAMS", "SAMPLER", "AUGMENT", "quiet_transformers",
           "make_model", "poison_loss", "step_seed", "sample_batch", "augment", "to_float",
           "evaluate", "decay_groups"]

# docs/experiments.md#convnext: HF ConvNeXt V2 "Atto" with a 1x1 stem for 32x32 images.
ATTO_CONFIG = dict(patch_size=1, image_size=32, hidden_sizes=[40, 80, 160, 320],
                   depths=[2, 2, 6, 2], drop_path_rate=0.1, num_labels=10)
ATTO_N_PARAMS = 3_388_810

AUGMENT = 1  # the augmentation's random stream of a training step (SAMPLER = 0 draws the batch)


def quiet_transformers() -> None:
    """No per-file progress bars from save_pretrained / from_pretrained (stage logs stay short)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def make_model(seed: int, **overrides):
    """A freshly initialised ``ConvNextV2ForImageClassification`` (float32) from
    :data:`ATTO_CONFIG` updated with ``overrides`` (e.g. smaller ``hidden_sizes`` in tests;
    params.yaml train_convnext.model_overrides); ``torch.manual_seed(seed)`` first, so the same
    seed gives the same initialisation."""
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    torch.manual_seed(seed)
    return ConvNextV2ForImageClassification(ConvNextV2Config(**{**ATTO_CONFIG, **overrides})).float()


def augment(images: torch.Tensor) -> torch.Tensor:
    """RandAugment → RandomHorizontalFlip → RandomCrop(32, padding=4) → float [0, 1], each
    image independently (torchvision transforms v2; the global torch RNG, which the training
    step seeds). images: (B, 3, 32, 32) uint8. Returns (B, 3, 32, 32) float32."""
    from torchvision.transforms import v2

    t = v2.Compose([v2.RandAugment(), v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=4),
                    v2.ToDtype(torch.float32, scale=True)])
    return torch.stack([t(img) for img in images])


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (n, 3, 32, 32) -> float32 in [0, 1] (the network's input; no normalisation)."""
    return torch.as_tensor(images).float().div_(255.0)


@torch.no_grad()
def evaluate(model, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Accuracy (fraction) and mean cross-entropy (nats) of ``model`` (eval mode, float32) on
    uint8 images (n, 3, 32, 32) with labels (n,)."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size]).to(device)
        y = torch.as_tensor(labels[i : i + batch_size]).to(device)
        logits = model(x).logits.float()
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return {"accuracy": correct / len(images), "loss": loss / len(images)}


def decay_groups(model, weight_decay: float) -> list[dict]:
    """The Hugging Face Trainer's AdamW grouping: weight decay except on biases and LayerNorms.
    Each group's ``params`` are (name, parameter) pairs, so the optimizer's state dict keeps the
    names (:func:`localvol.adam_moment` maps ν by name)."""
    no_decay = set()
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            no_decay.update(f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False))
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if name in no_decay or name.endswith("bias") else decay).append((name, p))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
