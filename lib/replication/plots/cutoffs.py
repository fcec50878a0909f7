"""Aggregate log volume against the cutoff (the paper's Figures 6, 7)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["cutoff_sweep"]


def cutoff_sweep(df: pd.DataFrame, n_params: int, reference: pd.DataFrame, *,
                 width: float = 7.0, height: float = 4.5) -> tuple[plt.Figure, plt.Axes]:
    """Aggregate log10 probability vs cutoff, one line per ``series`` of ``df`` (rows of
    :func:`replication.sweep.summary_table` with a ``series`` column), with the reference line
    of slope N/2 (log10 per decade of cutoff: the volume of an N-dimensional quadratic basin
    grows as cutoff^(N/2)) through the middle cutoff of the ``reference`` rows. Log x axis."""
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    for series, g in df.groupby("series", sort=False):
        ax.plot(g["cutoff"], g["log10_volume"], marker="o", label=series)
    ref = reference.sort_values("cutoff")
    mid = ref.iloc[len(ref) // 2]
    c = np.array(sorted(df["cutoff"].unique()))
    ax.plot(c, mid["log10_volume"] + (n_params / 2) * (np.log10(c) - math.log10(mid["cutoff"])),
            color="k", linewidth=0.8, label="slope N/2")
    ax.set_xscale("log")
    ax.set_xlabel("cutoff (nats of mean KL)")
    ax.set_ylabel("log10 probability (aggregate)")
    return fig, ax
