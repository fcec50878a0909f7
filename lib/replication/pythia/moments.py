"""Adam's second moment ν at a Pythia checkpoint, the spectrum of the Adam preconditioner
(paper eq. 15-18; docs/experiments.md#pythia). The public checkpoints carry none, so ν
comes from:

- ``optimizer_state``: our own ``optimizer.pt`` (:func:`localvol.adam_moment`), or raw
  GPT-NeoX/DeepSpeed files (:func:`read_deepspeed_moments` + :func:`map_flat_groups`: flat fp32
  groups without names, mapped back by value and verified against the model's weights);
  :func:`optimizer_state_nu` picks the one there is;
- ``squared_gradients``: :func:`squared_gradient_moment`, an EMA (β2 = 0.95) of squared
  gradients of the LM loss over a few batches at the checkpoint. An APPROXIMATION of Adam's ν:
  Adam's buffer averages gradients along the trajectory (at earlier weights, with the training
  batch size), this one at the checkpoint's weights only. :func:`compare_moments` says how far
  apart the two are as preconditioners.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import torch

import localvol
from replication.pythia.data import windows

__all__ = ["read_deepspeed_moments", "map_flat_groups", "squared_gradient_moment",
           "squared_gradient_nu", "optimizer_state_nu", "compare_moments"]


def read_deepspeed_moments(path: str | os.PathLike, key: str = "exp_avg_sq"):
    """(flat fp32 weight groups, flat moment groups), lists of 1-D float32 tensors, of a
    GPT-NeoX/DeepSpeed ``mp_rank_00_model_states.pt``: ``optimizer.fp32_groups_flat`` and
    ``optimizer.optimizer_state_dict.state[g][key]`` (docs/experiments.md#pythia)."""
    sd = torch.load(path, map_location="cpu", weights_only=False)
    opt = sd["optimizer"]
    flat = [t.float().reshape(-1) for t in opt["fp32_groups_flat"]]
    state = opt["optimizer_state_dict"]["state"]
    moments = [state[g][key].float().reshape(-1) for g in range(len(flat))]
    return flat, moments


def _place_group(named: list, placed: dict, g: int, flat: torch.Tensor, *, rtol: float,
                 atol: float) -> None:
    """Greedily place parameters along flat group ``g`` (see :func:`map_flat_groups`)."""
    sizes = dict((n, p.numel()) for n, p in named)
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
            break  # alignment padding (checked by the caller: every parameter must be placed)
        placed[best] = (g, offset)
        offset += sizes[best]


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
            raise ValueError(f"group {g}: weights {tuple(flat.shape)} vs moments "
                             f"{tuple(mom.shape)}")
        _place_group(named, placed, g, flat, rtol=rtol, atol=atol)
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
    model's device. Raises ValueError for β2 outside [0, 1) or no batches.
    """
    if not 0 <= beta2 < 1:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2} (pythia_estimate.sqgrad_beta2)")
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


def squared_gradient_nu(model, stream: torch.Tensor, *, seed: int, batches: int, batch_size: int,
                        seq_len: int, beta2: float) -> torch.Tensor:
    """:func:`squared_gradient_moment` over ``batches`` random (batch_size, seq_len) windows of
    a training-like (T,) token stream, drawn from ``torch.Generator().manual_seed(seed + 1)``,
    each gradient clipped to norm 1 (as Pythia's training). Returns (N,) float32."""
    gen = torch.Generator().manual_seed(seed + 1)
    drawn = [windows(stream, batch_size, seq_len, gen) for _ in range(batches)]
    return squared_gradient_moment(model, drawn, beta2=beta2, grad_clip=1.0)


def optimizer_state_nu(model, state: dict | None, step: int,
                       raw_checkpoint_dir: str) -> torch.Tensor:
    """Adam's ν of a checkpoint from its optimizer state: our ``optimizer.pt`` (``state``), else
    ``raw_checkpoint_dir/global_step{N}/mp_rank_00_model_states.pt`` (raw DeepSpeed), else at
    step 0 zeros (Adam starts at ν = 0; the state saved before the first update holds no
    moments, and ν = 0 is the truth there).

    Returns (N,) float32 (on the model's device for the zeros). Raises ValueError naming
    ``pythia_estimate.adam_source`` if a trained step has no optimizer state."""
    if state is not None:
        return localvol.adam_moment(model, state, order=2, allow_never_stepped=step == 0).float()
    if raw_checkpoint_dir:
        path = Path(raw_checkpoint_dir) / f"global_step{step}" / "mp_rank_00_model_states.pt"
        if path.exists():
            flat, mom = read_deepspeed_moments(path)
            return map_flat_groups(model, flat, mom)[0]
    if step == 0:
        device = next(model.parameters()).device
        return torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
    raise ValueError(f"step {step}: no optimizer state (optimizer.pt or raw DeepSpeed checkpoint "
                     "in pythia_estimate.raw_checkpoint_dir); set pythia_estimate.adam_source: "
                     "squared_gradients")


def compare_moments(nu: torch.Tensor, nu_sq: torch.Tensor, eps: float, exponent: float) -> dict:
    """How close two (N,) ν vectors are as preconditioners: the correlation of log ν where both
    are positive, the median ratio ``nu_sq / nu`` there, the correlation and RMS difference of
    the log unit-determinant scales they induce (eq. 18 with ``eps``, ``exponent``), and the
    fraction of entries positive in both."""
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
