"""Pythia across training (paper §4.3, Figures 2, 4, 6; REPLICATION.md §5.3, §7.4, §7.5).

Checkpoints (stage ``fetch_pythia``, :func:`fetch_stage`), in the Hugging Face hub's layout,
one folder per training step::

    CHECKPOINTS/step{N}/config.json, model.safetensors   (save_pretrained)
    CHECKPOINTS/step{N}/optimizer.pt                      (local source only: AdamW state dict)
    CHECKPOINTS/tokenizer/                                (the GPT-NeoX-20B tokenizer)
    CHECKPOINTS/manifest.json                             (source, steps, N, split, losses)

- ``source="hub"`` (paper profile): ``from_pretrained(repo_id, revision=f"step{N}")`` per step
  (a local folder holding ``step{N}/`` subfolders is read the same way, offline).
- ``source="local"`` (default profile; no hub is reachable here): a scaled-down GPT-NeoX with
  Pythia's architecture choices (rotary on 25 % of each head, parallel residual, untied
  embeddings, vocabulary 50,304) trained with AdamW (β 0.9/0.95, ε 1e-8, weight decay 0.1 on
  matrices, grad clip 1.0, warmup + cosine to 10 %), as Pythia, on the standard library's
  ``pydoc_data.topics`` (real English; a fixed set of topics is held out for evaluation).

Adam second moments ν (the public checkpoints have none):

- ``optimizer_state``: our own ``optimizer.pt`` (:func:`localvol.adam_moment`), or raw
  GPT-NeoX/DeepSpeed files (:func:`read_deepspeed_moments` + :func:`map_flat_groups`: flat fp32
  groups without names, mapped back by value and verified against the model's weights);
- ``squared_gradients``: :func:`squared_gradient_moment`, an EMA (β2 = 0.95) of squared
  gradients of the LM loss over a few batches at the checkpoint. An APPROXIMATION of Adam's ν:
  Adam's buffer averages gradients along the trajectory (at earlier weights, with the training
  batch size), this one at the checkpoint's weights only.

Estimates (stage ``estimate_pythia``, :func:`estimate_stage`): cost = mean KL from the
checkpoint over the REAL tokens of the evaluation text (padding masked; the count is reported,
REPLICATION.md §7.4), Gaussian prior N(0, σ²I) with σ = RMS of the step-0 parameters (computed;
the paper's 0.03998 for Pythia-31M), float32. Figure 4: every checkpoint, naive and Adam ν;
Figure 2: the final checkpoint with more samples; Figure 6: a cutoff sweep at the final
checkpoint. Aggregates (logsumexp − log k) are plotted, never the largest sample, and each
estimate's prior term −|θ0|²/(2σ²) and neighbourhood term are stored separately (§7.5).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from localvol.records import (
    check_distinct_steps,
    check_stage_settings,
    clear_progress,
    parameter_sha256,
    run_estimate,
    time_cost_call,
)
from localvol.stages import save_npz_atomic, write_json_atomic, write_timings

__all__ = [
    "PYTHIA_31M_CONFIG",
    "PAPER_STEPS",
    "check_steps",
    "model_config",
    "load_tokenizer",
    "local_documents",
    "token_stream",
    "tokenize_eval",
    "train_local",
    "fetch_hub",
    "fetch_stage",
    "load_checkpoint",
    "read_manifest",
    "read_deepspeed_moments",
    "map_flat_groups",
    "squared_gradient_moment",
    "estimate_stage",
]

EOS_TOKEN = "<|endoftext|>"  # id 0
MANIFEST = "manifest.json"

# EleutherAI/pythia-31m's config.json (shapes only): 30,494,720 parameters.
PYTHIA_31M_CONFIG = dict(
    vocab_size=50304, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
    intermediate_size=1024, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
    use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
    layer_norm_eps=1e-5, initializer_range=0.02, bos_token_id=0, eos_token_id=0,
)
PYTHIA_31M_N_PARAMS = 30_494_720

# The paper's 34 checkpoints (REPLICATION.md §5.3).
PAPER_STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 4000, 8000, 10000, 16000,
               20000, 30000, 33000, 40000, 50000, 60000, 66000, 70000, 80000, 90000, 100000,
               110000, 120000, 130000, 131000, 140000, 143000]


def check_steps(steps: Iterable[int]) -> list[int]:
    """Validate a checkpoint step list: distinct non-negative ints, increasing, starting at 0
    (σ is the RMS of the step-0 parameters). Returns it as a list of int."""
    steps = list(steps)
    if len(steps) < 2:
        raise ValueError(f"need at least two checkpoint steps (0 and a trained one), got {steps}")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"checkpoint steps must be non-negative integers, got {s!r}")
    if steps[0] != 0:
        raise ValueError(f"the first checkpoint step must be 0 (σ = RMS of step 0), got {steps[0]}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"checkpoint steps must be strictly increasing, got {steps}")
    return [int(s) for s in steps]


def model_config(*, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int,
                 vocab_size: int = 50304):
    """A GPTNeoXConfig with Pythia's architecture choices at the given (scaled-down) size."""
    from transformers import GPTNeoXConfig

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    cfg = dict(PYTHIA_31M_CONFIG)
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=intermediate, max_position_embeddings=max_positions,
               vocab_size=vocab_size)
    return GPTNeoXConfig(**cfg)


def load_tokenizer(path: str | os.PathLike):
    """The GPT-NeoX-20B tokenizer (Pythia's) from its ``tokenizer.json`` file or a folder saved
    by ``save_pretrained``; eos = ``<|endoftext|>`` (id 0), pad = id 1 (never in real text;
    the mask, not the pad id, says which tokens are real), right padding."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if path.is_dir():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    elif path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        raise FileNotFoundError(
            f"tokenizer {path} not found: the pipeline expects the GPT-NeoX-20B tokenizer at "
            "../shared/data/pythia-tokenizer/20B_tokenizer.json (beside the clone), or set "
            "fetch_pythia.tokenizer_path")
    if tok.convert_ids_to_tokens(0) != EOS_TOKEN:
        raise ValueError(f"{path}: id 0 is not {EOS_TOKEN}: not the GPT-NeoX tokenizer")
    # id 1 is "<|padding|>" in Pythia's hub tokenizer, "<|unk|>" in 20B_tokenizer.json
    tok.pad_token, tok.eos_token = tok.convert_ids_to_tokens(1), EOS_TOKEN
    tok.padding_side = "right"
    return tok


def local_documents(n_heldout: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``pydoc_data.topics`` (79 documents of Python reference prose) into (train,
    held-out) dicts topic → text; the held-out topics are ``n_heldout`` drawn with
    ``numpy.random.default_rng(seed)`` from the sorted topic names."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    if not 1 <= n_heldout < len(names):
        raise ValueError(f"n_heldout must be in [1, {len(names) - 1}], got {n_heldout}")
    order = np.random.default_rng(seed).permutation(len(names))
    held = sorted(names[i] for i in order[:n_heldout])
    train = {n: topics[n] for n in names if n not in held}
    return train, {n: topics[n] for n in held}


def token_stream(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """Concatenate documents, each followed by ``<|endoftext|>``: (T,) int64 token ids."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.int64)


def tokenize_eval(tokenizer, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """Tokenise evaluation documents together, right-padded to the longest and truncated at
    ``max_tokens`` (as the paper's code: 20 Pile documents, 1,024 tokens).

    Returns {"input_ids": (n, T) int64, "attention_mask": (n, T) int64 (1 = real token),
    "n_real_tokens": int, "n_padding_tokens": int}. The KL averages over real tokens only:
    the paper's "10,926 tokens" were the padding positions (REPLICATION.md §7.4)."""
    if not texts:
        raise ValueError("no evaluation documents")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_tokens,
                    return_tensors="pt")
    mask = enc["attention_mask"].to(torch.int64)
    if tokenizer.padding_side != "right":
        raise ValueError("evaluation text must be right-padded")
    n_real = int(mask.sum())
    return {"input_ids": enc["input_ids"].to(torch.int64), "attention_mask": mask,
            "n_real_tokens": n_real, "n_padding_tokens": int(mask.numel() - n_real)}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step{step}"


def _lr_at(step: int, *, lr: float, warmup: int, total: int, final_fraction: float) -> float:
    """Linear warmup, then cosine decay from lr to final_fraction·lr at ``total`` (Pythia)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(model, weight_decay: float) -> list[dict]:
    """GPT-NeoX groups: weight decay on matrices (≥ 2-D), none on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """(batch, seq_len) random windows of a token stream."""
    if len(stream) <= seq_len:
        raise ValueError(f"token stream ({len(stream)}) shorter than seq_len ({seq_len})")
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
    return stream[starts[:, None] + torch.arange(seq_len)]


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


def train_local(
    out_dir: str | os.PathLike,
    *,
    tokenizer,
    steps: list[int],
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    seq_len: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    betas: tuple[float, float],
    adam_eps: float,
    grad_clip: float,
    n_heldout: int,
    seed: int,
    progress: bool = True,
    timings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a scaled-down Pythia on pydoc_data.topics; save ``step{N}/`` (model + AdamW state)
    for each N in ``steps`` (the last one is the number of updates). Returns the manifest (no
    wall times: ``timings``, if given, receives them)."""
    from transformers import GPTNeoXForCausalLM

    steps = check_steps(steps)
    torch.manual_seed(seed)
    train_docs, held_docs = local_documents(n_heldout, seed)
    stream = token_stream(tokenizer, train_docs.values())  # (T,)
    held_stream = token_stream(tokenizer, held_docs.values())
    model = GPTNeoXForCausalLM(model_config(
        hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
        max_positions=seq_len, vocab_size=50304)).float()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=tuple(betas),
                            eps=adam_eps)
    gen = torch.Generator().manual_seed(seed)
    total = steps[-1]
    history, losses, hashes = [], [], {}
    t0 = time.perf_counter()
    for step in range(total + 1):
        if step in steps:
            held_loss = _mean_loss(model, held_stream, seq_len)
            d = _step_dir(out_dir, step)
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
            g["lr"] = _lr_at(step, lr=lr, warmup=warmup, total=total, final_fraction=0.1)
        x = _windows(stream, batch_size, seq_len, gen)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return {"source": "local", "seed": seed, "steps": steps, "n_params": sum(p.numel() for p in model.parameters()),
            "config": model.config.to_dict(), "n_train_tokens": len(stream),
            "heldout_topics": sorted(held_docs), "n_heldout_tokens": len(held_stream),
            "history": history, "parameter_sha256": hashes}


def fetch_hub(out_dir: str | os.PathLike, *, repo_id: str, steps: list[int],
              local_files_only: bool = False, progress: bool = True) -> dict[str, Any]:
    """Save ``from_pretrained(repo_id, revision=f"step{N}")`` (float32) as ``step{N}/`` for
    each step. ``repo_id`` may be a local folder of ``step{N}/`` subfolders (read offline)."""
    from transformers import AutoModelForCausalLM

    steps = check_steps(steps)
    n_params = None
    hashes = {}
    for step in steps:
        if Path(repo_id).is_dir():
            model = AutoModelForCausalLM.from_pretrained(
                _step_dir(repo_id, step), dtype=torch.float32, local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                repo_id, revision=f"step{step}", dtype=torch.float32,
                local_files_only=local_files_only)
        n = sum(p.numel() for p in model.parameters())
        if n_params is not None and n != n_params:
            raise ValueError(f"step {step} has {n} parameters, earlier steps {n_params}")
        n_params = n
        model.save_pretrained(_step_dir(out_dir, step))
        hashes[str(step)] = parameter_sha256(model)
        if progress:
            print(f"step {step}: {n:,} parameters", flush=True)
    return {"source": "hub", "repo_id": str(repo_id), "steps": steps, "n_params": n_params,
            "config": model.config.to_dict(), "parameter_sha256": hashes}


def fetch_stage(*, checkpoints_dir: str, source: str, steps: list[int], tokenizer_path: str,
                repo_id: str, hidden: int, layers: int, heads: int, intermediate: int,
                seq_len: int, batch_size: int, lr: float, warmup: int, weight_decay: float,
                betas: list[float], adam_eps: float, grad_clip: float, n_heldout: int,
                seed: int, known_duplicates: list[list[int]] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run the ``fetch_pythia`` stage: write ``checkpoints_dir`` (see the module docstring)
    atomically (built beside it, then renamed). Returns the manifest, which records the
    SHA-256 of every step's parameters: two steps with identical weights are an error (public
    Pythia revisions have been byte-identical across steps) unless the pair is listed in
    ``known_duplicates`` (``[[a, b], ...]``)."""
    steps = check_steps(steps)
    known_duplicates = [list(map(int, pair)) for pair in (known_duplicates or [])]
    if source not in ("hub", "local"):
        raise ValueError(f"source must be 'hub' or 'local', got {source!r}")
    for name, value in {"hidden": hidden, "layers": layers, "heads": heads,
                        "intermediate": intermediate, "seq_len": seq_len,
                        "batch_size": batch_size}.items():
        if value < 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    if not (lr > 0 and 0 <= weight_decay and adam_eps > 0 and grad_clip > 0 and warmup >= 1):
        raise ValueError("need lr > 0, weight_decay ≥ 0, adam_eps > 0, grad_clip > 0, warmup ≥ 1")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    tokenizer = load_tokenizer(tokenizer_path)
    out = Path(checkpoints_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if source == "local":
            manifest = train_local(
                tmp, tokenizer=tokenizer, steps=steps, hidden=hidden, layers=layers,
                heads=heads, intermediate=intermediate, seq_len=seq_len, batch_size=batch_size,
                lr=lr, warmup=warmup, weight_decay=weight_decay, betas=tuple(betas),
                adam_eps=adam_eps, grad_clip=grad_clip, n_heldout=n_heldout, seed=seed,
                progress=progress, timings=timings)
        else:
            manifest = fetch_hub(tmp, repo_id=repo_id, steps=steps, progress=progress)
        check_distinct_steps(manifest["parameter_sha256"], known_duplicates,
                             key="fetch_pythia.known_duplicates")
        manifest["known_duplicates"] = known_duplicates
        tokenizer.save_pretrained(tmp / "tokenizer")
        manifest["tokenizer"] = str(tokenizer_path)
        write_json_atomic(tmp / MANIFEST, manifest)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_timings(out, {**timings, "wall_time_s": time.perf_counter() - t0})
    return manifest


def read_manifest(checkpoints_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoints_dir) / MANIFEST).read_text())


def load_checkpoint(checkpoints_dir: str | os.PathLike, step: int):
    """(model in float32 eval mode, AdamW state dict or None) of ``step{N}/``."""
    from transformers import GPTNeoXForCausalLM

    d = _step_dir(checkpoints_dir, step)
    model = GPTNeoXForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True)
    model.eval()
    opt = d / "optimizer.pt"
    state = torch.load(opt, map_location="cpu", weights_only=True) if opt.exists() else None
    return model, state


# ---------------------------------------------------------------------------------------------
# Adam second moments
# ---------------------------------------------------------------------------------------------


def read_deepspeed_moments(path: str | os.PathLike, key: str = "exp_avg_sq"):
    """(flat fp32 weight groups, flat moment groups) of a GPT-NeoX/DeepSpeed
    ``mp_rank_00_model_states.pt``: ``optimizer.fp32_groups_flat`` and
    ``optimizer.optimizer_state_dict.state[g][key]`` (REPLICATION.md §5.3)."""
    sd = torch.load(path, map_location="cpu", weights_only=False)
    opt = sd["optimizer"]
    flat = [t.float().reshape(-1) for t in opt["fp32_groups_flat"]]
    state = opt["optimizer_state_dict"]["state"]
    moments = [state[g][key].float().reshape(-1) for g in range(len(flat))]
    return flat, moments


def map_flat_groups(model, flat_groups: list[torch.Tensor], moment_groups: list[torch.Tensor],
                    *, rtol: float = 1e-3, atol: float = 1e-3) -> tuple[torch.Tensor, dict]:
    """Map flat, nameless optimizer groups back to ``model``'s parameters by value.

    Walking each flat group from offset 0, the parameter placed next is the not-yet-placed one
    (that fits) whose values are closest (mean absolute difference) to the slice; among
    equally close ones (e.g. identical LayerNorm gains at initialisation), the first in
    ``named_parameters`` order, which is the order DeepSpeed flattens a group in (the authors'
    greedy match left such ties to chance). Trailing entries no parameter matches are taken
    as alignment padding. The reconstruction is then verified: every parameter placed, and the
    flat weights equal the model's (``allclose(rtol, atol)``), else ValueError.

    Returns (moment vector (N,) in ``parameters_to_vector`` order, info with the placement
    and the relative reconstruction error).
    """
    named = [(n, p.detach().float().reshape(-1)) for n, p in model.named_parameters()]
    if len(flat_groups) != len(moment_groups):
        raise ValueError("need one moment group per flat weight group")
    placed: dict[str, tuple[int, int]] = {}
    for g, (flat, mom) in enumerate(zip(flat_groups, moment_groups)):
        if flat.shape != mom.shape:
            raise ValueError(f"group {g}: weights {tuple(flat.shape)} vs moments {tuple(mom.shape)}")
        offset = 0
        while offset < flat.numel():
            remaining = flat.numel() - offset
            best, best_err = None, math.inf
            for name, p in named:
                if name in placed or p.numel() > remaining:
                    continue
                err = float((flat[offset : offset + p.numel()] - p).abs().mean())
                if err < best_err - 1e-12:  # strictly better: ties keep the earlier parameter
                    best, best_err = name, err
            if best is None or best_err > atol + rtol * float(flat[offset:].abs().mean()):
                break  # alignment padding (checked below: every parameter must be placed)
            placed[best] = (g, offset)
            offset += dict(named)[best].numel()
    missing = [n for n, _ in named if n not in placed]
    if missing:
        raise ValueError(f"{len(missing)} parameters not found in the flat groups by value "
                         f"(first: {missing[0]}); not this model's checkpoint?")
    weights, moments = [], []
    for name, p in named:
        g, off = placed[name]
        weights.append(flat_groups[g][off : off + p.numel()])
        moments.append(moment_groups[g][off : off + p.numel()])
    w = torch.cat(weights)
    theta = torch.cat([p for _, p in named])
    if not torch.allclose(w, theta, rtol=rtol, atol=atol):
        raise ValueError("reassembled flat weights differ from the model's: mapping failed")
    rel = float(torch.linalg.vector_norm(w - theta) / torch.linalg.vector_norm(theta))
    return torch.cat(moments), {"placement": placed, "relative_reconstruction_error": rel}


def squared_gradient_moment(model, batches: Iterable[torch.Tensor], *, beta2: float = 0.95,
                            grad_clip: float | None = None) -> torch.Tensor:
    """Estimate Adam's second moment ν at a checkpoint from the checkpoint alone.

    ν_t = β2 ν_{t−1} + (1 − β2) g_t², ν_0 = 0, g_t = ∇θ of the mean next-token cross-entropy on
    batch t (a (B, T) tensor of token ids), clipped to norm ``grad_clip`` if given (as the
    training loop clips before Adam); returned bias-corrected, ν_n / (1 − β2ⁿ), the value a
    long-running EMA approaches. APPROXIMATION: Adam's ν averages gradients at the earlier
    weights along the training trajectory; this one, at the checkpoint's weights only.

    Returns (N,) float32 in ``parameters_to_vector(model.parameters())`` order, on the
    model's device.
    """
    if not 0 <= beta2 < 1:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
    params = [p for p in model.parameters()]
    device = params[0].device
    nu = torch.zeros(sum(p.numel() for p in params), device=device)
    n = 0
    model.eval()  # no dropout: the gradient of the deterministic loss
    for x in batches:
        x = x.to(device)
        grads = torch.autograd.grad(model(input_ids=x, labels=x).loss, params, allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1)
                       for p, gr in zip(params, grads)]).float()
        if grad_clip is not None:
            norm = float(torch.linalg.vector_norm(g))
            if norm > grad_clip:
                g = g * (grad_clip / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
        nu = beta2 * nu + (1 - beta2) * g * g
        n += 1
    if n == 0:
        raise ValueError("no batches")
    return nu / (1 - beta2**n)


# ---------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------


def _eval_texts(eval_source: str, n_docs: int, manifest: dict) -> list[str]:
    """Held-out pydoc topics (``"local"``) or the first ``n_docs`` lines' ``text`` of a JSONL
    file (e.g. The Pile's validation set, val.jsonl)."""
    if eval_source == "local":
        if "heldout_topics" not in manifest:
            raise ValueError("eval_source 'local' needs checkpoints from the local source "
                             "(held-out topics); give a JSONL path for hub checkpoints")
        from pydoc_data.topics import topics

        return [topics[t] for t in manifest["heldout_topics"][:n_docs]]
    texts = []
    with open(eval_source) as f:
        for line in f:
            if len(texts) == n_docs:
                break
            texts.append(json.loads(line)["text"])
    if len(texts) < n_docs:
        raise ValueError(f"{eval_source} has only {len(texts)} documents, need {n_docs}")
    return texts


def _flat(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def estimate_stage(
    *,
    checkpoints_dir: str,
    estimates_path: str,
    metrics_path: str,
    samples_path: str,
    checkpoint_dir: str,
    eval_source: str,
    n_eval_docs: int,
    max_eval_tokens: int,
    data_batch_size: int,
    direction_batch_size: int,
    cutoff: float,
    rtol: float,
    seed: int,
    exponent: float,
    adam_eps: float,
    adam_source: str,
    raw_checkpoint_dir: str,
    k_checkpoints: int,
    k_histogram: int,
    cutoffs: list[float],
    cutoff_adam_eps: list[float],
    k_cutoffs: int,
    sqgrad_batches: int,
    sqgrad_batch_size: int,
    sqgrad_seq_len: int,
    sqgrad_beta2: float,
    compare_squared_gradients: bool,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the ``estimate_pythia`` stage (module docstring). Writes the estimates JSON (config,
    token counts, σ, every estimate's aggregates with prior and neighbourhood terms), metrics
    JSON and per-sample NPZ (``<key>__samples``). Returns the estimates JSON."""
    import localvol

    if adam_source not in ("optimizer_state", "squared_gradients"):
        raise ValueError(f"adam_source must be 'optimizer_state' or 'squared_gradients', "
                         f"got {adam_source!r}")
    check_stage_settings(
        cutoffs=cutoffs, n_eval_docs=n_eval_docs, max_eval_tokens=max_eval_tokens,
        data_batch_size=data_batch_size, direction_batch_size=direction_batch_size,
        k_checkpoints=k_checkpoints, k_histogram=k_histogram, k_cutoffs=k_cutoffs,
        sqgrad_batches=sqgrad_batches, sqgrad_batch_size=sqgrad_batch_size,
        sqgrad_seq_len=sqgrad_seq_len)
    if not cutoff_adam_eps or any(e < 0 for e in cutoff_adam_eps) or adam_eps < 0:
        raise ValueError("Adam ε values must be ≥ 0")
    manifest = read_manifest(checkpoints_dir)
    steps = check_steps(manifest["steps"])
    tokenizer = load_tokenizer(Path(checkpoints_dir) / "tokenizer")
    ev = tokenize_eval(tokenizer, _eval_texts(eval_source, n_eval_docs, manifest), max_eval_tokens)

    # σ = RMS of the step-0 parameters (REPLICATION.md §3.1), computed
    model0, _ = load_checkpoint(checkpoints_dir, 0)
    theta0 = _flat(model0).double()
    sigma = float(theta0.pow(2).mean().sqrt())
    prior = localvol.GaussianPrior(sigma)
    del model0

    if compare_squared_gradients or adam_source == "squared_gradients":
        if "heldout_topics" in manifest:
            train_docs, _ = local_documents(len(manifest["heldout_topics"]), _manifest_seed(manifest))
            sq_stream = token_stream(tokenizer, train_docs.values())
        else:  # hub: training-like text = the documents after the evaluation ones
            if eval_source == "local":
                raise ValueError("squared gradients on hub checkpoints need a JSONL eval_source")
            sq_stream = token_stream(tokenizer, _eval_texts(
                eval_source, n_eval_docs + sqgrad_batches * sqgrad_batch_size, manifest)[n_eval_docs:])

    def sq_nu(model):
        gen = torch.Generator().manual_seed(seed + 1)
        batches = [_windows(sq_stream, sqgrad_batch_size, sqgrad_seq_len, gen)
                   for _ in range(sqgrad_batches)]
        return squared_gradient_moment(model, batches, beta2=sqgrad_beta2, grad_clip=1.0)

    def true_nu(model, state, step):
        if state is not None:
            # the state saved before the first update holds no moments: ν = 0 is the truth there
            return localvol.adam_moment(model, state, order=2, allow_never_stepped=step == 0).float()
        if raw_checkpoint_dir:
            path = Path(raw_checkpoint_dir) / f"global_step{step}" / "mp_rank_00_model_states.pt"
            if path.exists():
                flat, mom = read_deepspeed_moments(path)
                return map_flat_groups(model, flat, mom)[0]
        if step == 0:
            return torch.zeros(sum(p.numel() for p in model.parameters()), device=device)  # Adam: ν = 0
        raise ValueError(f"step {step}: no optimizer state (optimizer.pt or raw DeepSpeed "
                         "checkpoint); use adam_source: squared_gradients")

    results: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    timings: dict[str, Any] = {}
    t_stage = time.perf_counter()

    def run(key, model, anchor, cost, *, k, cut, nu=None, eps=None, meta=None):
        record, arr = run_estimate(cost, anchor, prior=prior, cutoff=cut, n_samples=k, nu=nu,
                                   eps=eps, exponent=exponent, rtol=rtol, seed=seed,
                                   batch_size=direction_batch_size, progress_dir=checkpoint_dir,
                                   key=key, meta=meta, progress=progress, timings=timings,
                                   salt=(eval_source, n_eval_docs, max_eval_tokens, str(device)))
        results[key] = record
        arrays.update(arr)
        return record

    adam_label = "Adam ν" if adam_source == "optimizer_state" else "Adam ν (squared-gradient EMA)"
    comparison = {}
    kl_time = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hashes: dict[str, str] = {}
    for step in steps:
        model, state = load_checkpoint(checkpoints_dir, step)
        hashes[str(step)] = _verified_hash(model, step, manifest)
        check_distinct_steps(hashes, manifest.get("known_duplicates", []),
                             key="fetch_pythia.known_duplicates")
        model.to(device)
        anchor = _flat(model)  # (N,) float32, on the GPU when there is one
        cost = localvol.ExpectedKL(model, ev["input_ids"], batch_size=data_batch_size,
                                   attention_mask=ev["attention_mask"])
        if kl_time is None:
            kl_time = time_cost_call(cost, anchor[None])
        nu = true_nu(model, state, step) if adam_source == "optimizer_state" else sq_nu(model)
        nu = nu.to(device)
        final = step == steps[-1]
        base = {"step": step, "anchor_rms": float(anchor.double().pow(2).mean().sqrt())}
        run(f"ckpt_naive_step{step}", model, anchor, cost, k=k_checkpoints, cut=cutoff,
            meta={**base, "series": "naive", "figure": 4})
        run(f"ckpt_adam_step{step}", model, anchor, cost, k=k_checkpoints, cut=cutoff, nu=nu,
            eps=adam_eps, meta={**base, "series": adam_label, "figure": 4})
        if not final:
            continue
        run("hist_naive", model, anchor, cost, k=k_histogram, cut=cutoff,
            meta={**base, "series": "naive", "figure": 2})
        run("hist_adam", model, anchor, cost, k=k_histogram, cut=cutoff, nu=nu, eps=adam_eps,
            meta={**base, "series": f"{adam_label}, ε={adam_eps:g}", "figure": 2})
        for i, cut in enumerate(cutoffs):
            run(f"cutoff_naive_{i}", model, anchor, cost, k=k_cutoffs, cut=cut,
                meta={**base, "series": "naive", "figure": 6})
            for j, eps in enumerate(cutoff_adam_eps):
                run(f"cutoff_adam{j}_{i}", model, anchor, cost, k=k_cutoffs, cut=cut, nu=nu,
                    eps=eps, meta={**base, "series": f"{adam_label}, ε={eps:g}", "figure": 6})
        if compare_squared_gradients and adam_source == "optimizer_state":
            t0 = time.perf_counter()
            nu_sq = sq_nu(model)
            timings["squared_gradient_wall_time_s"] = time.perf_counter() - t0
            rec = run("hist_sqgrad", model, anchor, cost, k=k_histogram, cut=cutoff, nu=nu_sq,
                      eps=adam_eps, meta={**base, "series": f"squared-gradient EMA ν, ε={adam_eps:g}",
                                          "figure": 2})
            comparison = _compare_moments(nu, nu_sq, adam_eps, exponent)
            comparison.update({
                "log10_volume_true_nu": results["hist_adam"]["log10_volume"],
                "log10_volume_squared_gradients": rec["log10_volume"],
                "log10_volume_naive": results["hist_naive"]["log10_volume"],
            })
            comparison["difference_log10"] = (comparison["log10_volume_squared_gradients"]
                                              - comparison["log10_volume_true_nu"])

    summary = {
        "config": {"source": manifest["source"], "steps": steps, "n_params": manifest["n_params"],
                   "sigma": sigma, "cutoff": cutoff, "rtol": rtol, "seed": seed,
                   "exponent": exponent, "adam_eps": adam_eps, "adam_source": adam_source,
                   "k_checkpoints": k_checkpoints, "k_histogram": k_histogram,
                   "k_cutoffs": k_cutoffs, "cutoffs": cutoffs, "cutoff_adam_eps": cutoff_adam_eps,
                   "eval_source": eval_source, "n_eval_docs": n_eval_docs,
                   "max_eval_tokens": max_eval_tokens, "data_batch_size": data_batch_size,
                   "direction_batch_size": direction_batch_size, "dtype": "float32",
                   "device": str(device)},
        "eval_tokens": {"shape": list(ev["input_ids"].shape), "n_real_tokens": ev["n_real_tokens"],
                        "n_padding_tokens": ev["n_padding_tokens"]},
        "squared_gradient_comparison": comparison,
        "training_history": manifest.get("history", []),
        "estimates": results,
    }
    write_json_atomic(estimates_path, summary)
    save_npz_atomic(samples_path, **arrays)
    write_json_atomic(metrics_path, metrics_from_summary(summary))
    write_timings(estimates_path, {"kl_evaluation_s": kl_time, "estimates": timings,
                                   "wall_time_s": time.perf_counter() - t_stage})
    clear_progress(checkpoint_dir)
    return summary


def _verified_hash(model, step: int, manifest: dict) -> str:
    """SHA-256 of a loaded checkpoint's parameters, checked against the fetch stage's record."""
    digest = parameter_sha256(model)
    recorded = manifest.get("parameter_sha256", {}).get(str(step))
    if recorded is None:
        raise ValueError(f"the manifest has no parameter hash for step {step}: checkpoints from an "
                         "older fetch_pythia; rerun it (dvc repro -f fetch_pythia)")
    if recorded != digest:
        raise ValueError(f"step{step}/ holds other weights than fetch_pythia recorded (SHA-256 "
                         f"{digest[:12]} vs {recorded[:12]}): the checkpoint changed after the fetch")
    return digest


def _manifest_seed(manifest: dict) -> int:
    return int(manifest.get("seed", 0))


def _compare_moments(nu: torch.Tensor, nu_sq: torch.Tensor, eps: float, exponent: float) -> dict:
    """How close two ν vectors are as preconditioners: correlation of log ν, median ratio, and
    the correlation of the log unit-determinant scales they induce."""
    from localvol import unit_determinant_scales

    a, b = nu.double(), nu_sq.double()
    pos = (a > 0) & (b > 0)
    la, lb = a[pos].log(), b[pos].log()
    corr = float(torch.corrcoef(torch.stack([la, lb]))[0, 1])
    sa = unit_determinant_scales(a, eps, exponent).log()
    sb = unit_determinant_scales(b, eps, exponent).log()
    return {
        "log_nu_correlation": corr,
        "median_ratio_sq_over_true": float((b[pos] / a[pos]).median()),
        "log_scale_correlation": float(torch.corrcoef(torch.stack([sa, sb]))[0, 1]),
        "log_scale_rms_difference": float((sa - sb).pow(2).mean().sqrt()),
        "fraction_both_positive": float(pos.double().mean()),
    }


def metrics_from_summary(summary: dict) -> dict:
    """Headline numbers for DVC: first and last checkpoint (naive, Adam), Figure 2 aggregates,
    the squared-gradient comparison."""
    est = summary["estimates"]
    steps = summary["config"]["steps"]
    out: dict[str, Any] = {"sigma": summary["config"]["sigma"],
                           "n_real_tokens": summary["eval_tokens"]["n_real_tokens"]}
    for step in (steps[0], steps[-1]):
        for series in ("naive", "adam"):
            r = est[f"ckpt_{series}_step{step}"]
            out[f"step{step}_{series}"] = {k: r[k] for k in (
                "log10_volume", "log10_prior_at_anchor", "log10_neighbourhood")}
    for key in ("hist_naive", "hist_adam", "hist_sqgrad"):
        if key in est:
            out[key] = {k: est[key][k] for k in (
                "log10_volume", "log10_prior_at_anchor", "log10_neighbourhood")}
    if summary["squared_gradient_comparison"]:
        c = summary["squared_gradient_comparison"]
        out["squared_gradients"] = {k: c[k] for k in (
            "difference_log10", "log_nu_correlation", "log_scale_correlation")}
    return out
