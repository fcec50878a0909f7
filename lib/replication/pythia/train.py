"""The local source of Pythia checkpoints (docs/experiments.md#pythia): a scaled-down GPT-NeoX with
Pythia's architecture choices (rotary on 25 % of each head, parallel residual, untied
embeddings, vocabulary 50,304) trained with AdamW as Pythia (β 0.9/0.95, ε 1e-8, weight decay
on matrices only, gradient clip 1.0, linear warmup then cosine to 10 %) on the standard
library's ``pydoc_data.topics``, a fixed set of topics held out for evaluation. Not
EleutherAI's weights: the hub is unreachable here."""
from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch

from replication.pythia.checkpoints import check_steps, model_config, step_dir
from replication.pythia.data import local_documents, token_stream, windows
from replication.sweep import parameter_sha256

__all__ = ["lr_at", "param_groups", "train_local"]


def lr_at(step: int, *, lr: float, warmup: int, total: int, final_fraction: float) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup over ``warmup`` steps, then
    cosine decay from ``lr`` to ``final_fraction``·lr at ``total`` (Pythia)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float) -> list[dict]:
    """GPT-NeoX groups: weight decay on matrices (≥ 2-D), none on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _mean_loss(model, stream: torch.Tensor, seq_len: int, max_tokens: int = 2048) -> float:
    """Mean next-token cross-entropy over consecutive windows of the first ``max_tokens``
    tokens of a stream (nats/token)."""
    stream = stream[:max_tokens]
    n = len(stream) // seq_len
    x = stream[: n * seq_len].reshape(n, seq_len)
    model.eval()
    losses = [float(model(input_ids=x[i : i + 8], labels=x[i : i + 8]).loss)
              for i in range(0, n, 8)]
    return float(np.mean(losses))


def train_local(out_dir: str | os.PathLike, *, tokenizer, steps: list[int], hidden: int,
                layers: int, heads: int, intermediate: int, seq_len: int, batch_size: int,
                lr: float, warmup: int, weight_decay: float, betas: tuple[float, float],
                adam_eps: float, grad_clip: float, n_heldout: int, seed: int,
                progress: bool = True, timings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a scaled-down Pythia on pydoc_data.topics; save ``step{N}/`` (model + AdamW state
    ``optimizer.pt``) for each N in ``steps`` (the last one is the number of updates).

    Returns the manifest: source, seed, steps, n_params, model config, token counts, the
    held-out topics, the loss history (nats/token) and each step's parameter SHA-256. No wall
    times (a rerun must write the same bytes): ``timings``, if given, receives them."""
    from transformers import GPTNeoXForCausalLM

    steps = check_steps(steps)
    torch.manual_seed(seed)
    train_docs, held_docs = local_documents(n_heldout, seed)
    stream = token_stream(tokenizer, train_docs.values())  # (T,)
    held_stream = token_stream(tokenizer, held_docs.values())
    model = GPTNeoXForCausalLM(model_config(
        hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
        max_positions=seq_len, vocab_size=50304)).float()
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas),
                            eps=adam_eps)
    gen = torch.Generator().manual_seed(seed)
    total = steps[-1]
    history, losses, hashes = [], [], {}
    t0 = time.perf_counter()
    for step in range(total + 1):
        if step in steps:
            held_loss = _mean_loss(model, held_stream, seq_len)
            d = step_dir(out_dir, step)
            model.save_pretrained(d)
            torch.save(opt.state_dict(), d / "optimizer.pt")
            hashes[str(step)] = parameter_sha256(model)
            history.append({"step": step, "train_loss": float(np.mean(losses[-20:])) if losses
                            else None, "heldout_loss": held_loss})
            if timings is not None:
                timings[f"step{step}_wall_time_s"] = time.perf_counter() - t0
            if progress:
                print(f"step {step}: held-out loss {held_loss:.3f}", flush=True)
        if step == total:
            break
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=lr, warmup=warmup, total=total, final_fraction=0.1)
        x = windows(stream, batch_size, seq_len, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    n_params = sum(p.numel() for p in model.parameters())
    return {"source": "local", "seed": seed, "steps": steps, "n_params": n_params,
            "config": model.config.to_dict(), "n_train_tokens": len(stream),
            "heldout_topics": sorted(held_docs), "n_heldout_tokens": len(held_stream),
            "history": history, "parameter_sha256": hashes}
