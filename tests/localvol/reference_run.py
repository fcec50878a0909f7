"""Fixed estimates whose per-sample terms a test compares against a stored reference.

``python tests/localvol/reference_run.py OUT.json`` writes them with whatever ``localvol`` is
importable (the stored ``data/reference_samples.json`` was written by the code before the
issue-12 speed work, commit 45d78b8); ``test_reference_samples.py`` reruns them with the
current code. Speed work may change a number only at float rounding.
"""
from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

import localvol as lv


def build():
    """A float64 8-16-4 tanh MLP with seeded random weights, and 64 seeded inputs.

    float64, so that the cost's rounding (which differs between CPUs' vector units in float32)
    cannot move a radius search across its acceptance band on another machine."""
    gen = torch.Generator().manual_seed(1234)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(64, 8, generator=gen)
    return model.double(), x.double()


def runs():
    """name -> VolumeEstimate for three settings: naive Gaussian, diagonal-preconditioned
    Gaussian with per-parameter σ, naive Lebesgue; k = 40 in batches of 16 (pilot 16)."""
    model, x = build()
    anchor = parameters_to_vector(model.parameters()).detach()
    n = anchor.numel()
    cost = lv.ExpectedKL(model, x)
    scales = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    sigma = torch.linspace(0.8, 1.2, n, dtype=torch.float64)
    common = dict(cutoff=1e-2, n_samples=40, batch_size=16, seed=7, progress=False)
    return {
        "naive_gaussian": lv.estimate_log_volume(cost, anchor, prior=lv.GaussianPrior(1.0), **common),
        "diagonal_gaussian": lv.estimate_log_volume(
            cost, anchor, prior=lv.GaussianPrior(sigma),
            preconditioner=lv.DiagonalPreconditioner(scales, eps=0.0), **common),
        "naive_lebesgue": lv.estimate_log_volume(cost, anchor, prior=lv.LebesguePrior(), **common),
    }


def as_record(est) -> dict:
    return {
        "log_volume": est.log_volume,
        "samples": est.samples.tolist(),
        "radii": est.radii.tolist(),
        "evaluations": est.evaluations.tolist(),
        "log_prior_at_anchor": est.log_prior_at_anchor,
    }


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump({name: as_record(est) for name, est in runs().items()}, f, indent=1)
