"""Aggregates across training, split into the prior and neighbourhood terms (the paper's
Figures 4, 5), and training curves."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

__all__ = ["aggregates_across_training", "prior_terms_across_training"]


def aggregates_across_training(df: pd.DataFrame, total: plt.Axes, terms: plt.Axes, *,
                               x: str = "step") -> None:
    """Draw each ``series`` of ``df`` (rows of :func:`replication.sweep.summary_table` with
    ``series`` and ``x`` columns): the aggregate log10 probability on ``total`` and its
    neighbourhood term on ``terms``; both axes get a log x scale and labels."""
    for series, g in df.groupby("series", sort=False):
        total.plot(g[x], g["log10_volume"], marker="o", label=series)
        terms.plot(g[x], g["log10_neighbourhood"], marker="o", label=f"neighbourhood, {series}")
    for ax in (total, terms):
        ax.set_xscale("log")
    total.set_ylabel("log10 probability (aggregate)")
    terms.set_ylabel("log10 (terms of the aggregate)")


def prior_terms_across_training(df: pd.DataFrame, ax: plt.Axes, *, x: str = "step",
                                by: str | None = None) -> None:
    """The prior term −|θ0|²/(2σ² ln 10) of each checkpoint (one dashed line, or one per ``by``
    group, e.g. per training run)."""
    groups = [(None, df)] if by is None else list(df.groupby(by, sort=False))
    for i, (name, g) in enumerate(groups):
        g = g.drop_duplicates(x)
        label = "prior term −|θ0|²/(2σ²)" if name is None else f"prior term, {name}"
        ax.plot(g[x], g["log10_prior_term"], linestyle="--", color="k" if i == 0 else "grey",
                marker=".", label=label)
