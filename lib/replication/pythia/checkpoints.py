"""Pythia checkpoints on disk (docs/experiments.md#pythia): the model's shape, the step list, the
folder layout written by stage ``fetch_pythia`` (:mod:`.fetch`), loading a step, and checking
that a loaded step holds the weights the fetch recorded.

Layout, the Hugging Face hub's, one folder per training step::

    CHECKPOINTS/step{N}/config.json, model.safetensors   (save_pretrained)
    CHECKPOINTS/step{N}/optimizer.pt                      (local source only: AdamW state dict)
    CHECKPOINTS/tokenizer/                                (the GPT-NeoX-20B tokenizer)
    CHECKPOINTS/manifest.json                             (source, steps, N, split, hashes, ...)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from replication.sweep import check_distinct_steps, parameter_sha256

__all__ = ["PYTHIA_31M_CONFIG", "PYTHIA_31M_N_PARAMS", "PAPER_STEPS", "MANIFEST", "check_steps",
           "model_config", "step_dir", "read_manifest", "load_checkpoint", "flat_parameters",
           "verified_hash", "check_manifest_hashes"]

MANIFEST = "manifest.json"
DUPLICATES_KEY = "fetch_pythia.known_duplicates"

# EleutherAI/pythia-31m's config.json (shapes only): 30,494,720 parameters.
PYTHIA_31M_CONFIG = dict(
    vocab_size=50304, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
    intermediate_size=1024, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
    use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
    layer_norm_eps=1e-5, initializer_range=0.02, bos_token_id=0, eos_token_id=0,
)
PYTHIA_31M_N_PARAMS = 30_494_720

# The paper's 34 checkpoints (docs/experiments.md#pythia).
PAPER_STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 4000, 8000, 10000, 16000,
               20000, 30000, 33000, 40000, 50000, 60000, 66000, 70000, 80000, 90000, 100000,
               110000, 120000, 130000, 131000, 140000, 143000]


def check_steps(steps: Iterable[int]) -> list[int]:
    """Validate a checkpoint step list (``fetch_pythia.steps``): distinct non-negative ints,
    increasing, starting at 0 (σ is the RMS of the step-0 parameters). Returns it as a list of
    int; raises ValueError naming the key otherwise."""
    steps = list(steps)
    key = "(fetch_pythia.steps)"
    if len(steps) < 2:
        raise ValueError(f"need at least two checkpoint steps (0 and a trained one), got {steps} "
                         f"{key}")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"checkpoint steps must be non-negative integers, got {s!r} {key}")
    if steps[0] != 0:
        raise ValueError(f"the first checkpoint step must be 0 (σ = RMS of step 0), got {steps[0]} "
                         f"{key}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"checkpoint steps must be strictly increasing, got {steps} {key}")
    return [int(s) for s in steps]


def model_config(*, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int,
                 vocab_size: int = 50304):
    """A GPTNeoXConfig with Pythia's architecture choices (rotary on 25 % of each head,
    parallel residual, untied embeddings) at the given (scaled-down) size. Raises ValueError
    (naming ``fetch_pythia.hidden``) if ``hidden`` is not a multiple of ``heads``."""
    from transformers import GPTNeoXConfig

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}) "
                         "(fetch_pythia.hidden, fetch_pythia.heads)")
    cfg = dict(PYTHIA_31M_CONFIG)
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=intermediate, max_position_embeddings=max_positions,
               vocab_size=vocab_size)
    return GPTNeoXConfig(**cfg)


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """``root/step{N}``."""
    return Path(root) / f"step{step}"


def read_manifest(checkpoints_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest the fetch stage wrote. Raises FileNotFoundError (run fetch_pythia) if none."""
    path = Path(checkpoints_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the fetch_pythia stage first "
                                "(dvc repro fetch_pythia)")
    return json.loads(path.read_text())


def load_checkpoint(checkpoints_dir: str | os.PathLike, step: int):
    """(model in float32 eval mode on the CPU, AdamW state dict or None) of ``step{N}/``."""
    from transformers import GPTNeoXForCausalLM

    d = step_dir(checkpoints_dir, step)
    model = GPTNeoXForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True)
    model.eval()
    opt = d / "optimizer.pt"
    state = torch.load(opt, map_location="cpu", weights_only=True) if opt.exists() else None
    return model, state


def flat_parameters(model) -> torch.Tensor:
    """(N,) detached parameters in ``parameters_to_vector`` order, the model's dtype/device."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def verified_hash(model, step: int, manifest: dict) -> str:
    """SHA-256 of a loaded checkpoint's parameters, checked against the fetch stage's record.
    Raises ValueError if the manifest has none (an older fetch) or records other weights."""
    digest = parameter_sha256(model)
    recorded = manifest.get("parameter_sha256", {}).get(str(step))
    if recorded is None:
        raise ValueError(f"the manifest has no parameter hash for step {step}: checkpoints from an "
                         "older fetch_pythia; rerun it (dvc repro -f fetch_pythia)")
    if recorded != digest:
        raise ValueError(f"step{step}/ holds other weights than fetch_pythia recorded (SHA-256 "
                         f"{digest[:12]} vs {recorded[:12]}): the checkpoint changed after the "
                         "fetch")
    return digest


def check_manifest_hashes(manifest: dict, steps: list[int]) -> None:
    """Every step has a recorded parameter hash and no two steps hold identical weights unless
    listed in ``fetch_pythia.known_duplicates`` (what the fetch recorded; each loaded step is
    then checked against it with :func:`verified_hash`). Raises ValueError."""
    recorded = manifest.get("parameter_sha256", {})
    for step in steps:
        if str(step) not in recorded:
            raise ValueError(f"the manifest has no parameter hash for step {step}: checkpoints "
                             "from an older fetch_pythia; rerun it (dvc repro -f fetch_pythia)")
    check_distinct_steps({str(s): recorded[str(s)] for s in steps},
                         manifest.get("known_duplicates", []), key=DUPLICATES_KEY)
