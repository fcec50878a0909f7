"""Per-sample histograms with the aggregate marked (the paper's Figures 1, 2, 3)."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["sample_histograms"]

LN10 = math.log(10.0)


def sample_histograms(entries: list[tuple[str, float, np.ndarray]], *, bins: int,
                      width: float, height: float) -> plt.Figure:
    """Histograms of per-sample log10 probability, one colour per entry, with a dashed vertical
    line at each aggregate (logsumexp − log k).

    Args:
        entries: (label, aggregate log10 volume, (k,) per-sample log terms in NATS).
        bins: bins per histogram. width, height: inches.
    """
    frames = [pd.DataFrame({"estimate": label, "log10_probability": np.asarray(s, float) / LN10})
              for label, _, s in entries]
    df = pd.concat(frames, ignore_index=True)
    labels = [label for label, _, _ in entries]
    palette = dict(zip(labels, sns.color_palette("tab10", len(labels))))
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    finite = df[np.isfinite(df["log10_probability"])]
    sns.histplot(data=finite, x="log10_probability", hue="estimate", hue_order=labels,
                 palette=palette, bins=bins, common_bins=False, common_norm=False,
                 stat="probability", element="step", fill=False, linewidth=1.3, ax=ax)
    for label, aggregate, _ in entries:
        ax.axvline(aggregate, color=palette[label], linestyle="--", linewidth=1.2)
    ax.set_xlabel("log10 probability of the KL neighbourhood (per sample)")
    ax.set_ylabel("fraction of samples")
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                        title="estimate (dashed: aggregate)")
    return fig
