"""The checkpoints ``train_convnext`` writes and the estimate stages read
(docs/experiments.md#convnext)::

    CHECKPOINTS/manifest.json                      (runs, steps, N, data source, histories)
    CHECKPOINTS/<run>/config.json                  (the run's settings; a change restarts it)
    CHECKPOINTS/<run>/step{N}/config.json, model.safetensors   (save_pretrained)
    CHECKPOINTS/<run>/step{N}/optimizer.pt, scheduler.pt, metrics.json

Each history entry records the SHA-256 of the weights saved at its step; :func:`verify_weights`
checks a loaded checkpoint against it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from replication.convnext.model import quiet_transformers
from replication.sweep import parameter_sha256

__all__ = ["MANIFEST", "log_spaced_steps", "save_step", "read_manifest", "load_checkpoint",
           "verify_weights"]

MANIFEST = "manifest.json"


def log_spaced_steps(max_steps: int) -> list[int]:
    """Checkpoint steps 0, 1, 2, 4, …, up to ``max_steps`` (included even if not a power of 2).
    Raises ValueError for max_steps < 1 or not an integer (params.yaml train_convnext.max_steps)."""
    if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r} "
                         "(params.yaml train_convnext.max_steps)")
    steps, s = [0], 1
    while s < max_steps:
        steps.append(s)
        s *= 2
    return steps + [int(max_steps)]


def save_step(run_dir: Path, step: int, model, opt, sched, metrics: dict) -> None:
    """Write ``run_dir/step{N}/`` (weights, optimizer and scheduler state, ``metrics``) beside a
    temporary name, then rename it: a crash leaves no partial step."""
    final = run_dir / f"step{step}"
    tmp = run_dir / f".step{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(sched.state_dict(), tmp / "scheduler.pt")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def read_manifest(checkpoints_dir: str | Path) -> dict[str, Any]:
    """The manifest ``train_convnext`` wrote: ``runs`` ({name: {poison_probability, history}}),
    ``steps``, ``n_params``, ``source``, ``seed``, ``batch_size``."""
    path = Path(checkpoints_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {path}: run the train_convnext stage first")
    return json.loads(path.read_text())


def load_checkpoint(checkpoints_dir: str | Path, run: str, step: int):
    """(model in eval mode, float32, CPU; AdamW state dict or None at step 0) of one checkpoint.
    Raises FileNotFoundError if ``<run>/step{step}/`` does not exist."""
    from transformers import ConvNextV2ForImageClassification

    quiet_transformers()
    d = Path(checkpoints_dir) / run / f"step{step}"
    if not d.is_dir():
        raise FileNotFoundError(f"no checkpoint {d}")
    model = ConvNextV2ForImageClassification.from_pretrained(d).float().eval()
    state = torch.load(d / "optimizer.pt", map_location="cpu") if step > 0 else None
    return model, state


def verify_weights(model, manifest: dict, run: str, step: int) -> None:
    """The loaded weights must be those train_convnext saved at this step (the manifest's
    parameter SHA-256); ValueError otherwise, or when the manifest has no hash for the step."""
    history = {h["step"]: h for h in manifest["runs"][run]["history"]}
    recorded = history.get(step, {}).get("parameter_sha256")
    if recorded is None:
        raise ValueError(f"the manifest has no parameter hash for {run} step {step}: checkpoints "
                         "from an older train_convnext; rerun it (dvc repro -f train_convnext)")
    digest = parameter_sha256(model)
    if digest != recorded:
        raise ValueError(f"{run}/step{step}/ holds other weights than train_convnext recorded "
                         f"(SHA-256 {digest[:12]} vs {recorded[:12]})")
