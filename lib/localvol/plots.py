"""Figures (seaborn): Figure 1 of the paper and the digits MLP's training curves.

:func:`plot_stage` is the ``plot_mlp`` stage as a plain function: it reads the
``estimate_mlp`` results and writes Figure 1 (PNG and PDF), the aggregates table (CSV and
Markdown, with the figure caption) into ``figures/``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from localvol.figure1 import aggregates_table
from localvol.stages import atomic_path

__all__ = ["figure1", "figure1_caption", "training_curves", "plot_stage"]

LN10 = math.log(10.0)


def _samples_frame(summary: dict, samples: dict[str, np.ndarray]) -> pd.DataFrame:
    frames = []
    for name, r in summary["estimates"].items():
        values = np.asarray(samples[f"{name}__samples"], dtype=float) / LN10  # (k,) log10
        frames.append(pd.DataFrame({"preconditioner": r["label"], "log10_probability": values}))
    return pd.concat(frames, ignore_index=True)


def figure1(summary: dict, samples: dict[str, np.ndarray], *, bins: int = 40,
            width: float = 10.0, height: float = 4.5) -> plt.Figure:
    """Per-sample histograms of log10 probability, one colour per estimate, with a dashed
    vertical line at each aggregate (logsumexp − log k), as the paper's Figure 1.

    ``samples`` maps ``<name>__samples`` to (k,) per-sample log terms in nats.
    """
    df = _samples_frame(summary, samples)
    labels = [r["label"] for r in summary["estimates"].values()]
    palette = dict(zip(labels, sns.color_palette("tab10", len(labels))))
    sns.set_theme(style="whitegrid", context="paper")
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    finite = df[np.isfinite(df["log10_probability"])]
    sns.histplot(data=finite, x="log10_probability", hue="preconditioner", hue_order=labels,
                 palette=palette, bins=bins, common_bins=False, common_norm=False,
                 stat="probability", element="step", fill=True, alpha=0.25, ax=ax)
    for r in summary["estimates"].values():
        ax.axvline(r["log10_volume"], color=palette[r["label"]], linestyle="--", linewidth=1.2)
    ax.set_xlabel("log10 probability of the KL neighbourhood (per sample)")
    ax.set_ylabel("fraction of samples")
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                        title="estimate (dashed: aggregate)")
    return fig


def figure1_caption(summary: dict) -> str:
    c = summary["config"]
    k_pre = c["n_samples_preconditioned"]
    return (
        f"Figure 1 (replication). Local volume of the digits MLP (N = {c['n_params']:,} "
        f"parameters): histograms of per-sample log10 probability (naive k = "
        f"{c['n_samples_naive']:,}, each preconditioner k = {k_pre:,}); dashed lines are the "
        f"aggregated estimates (logsumexp − log k). Cost: mean KL from the anchor over the "
        f"{c['n_heldout']} held-out images, cutoff {c['cutoff']:g} nats. Measure: Gaussian "
        f"N(0, σ²I) centred at the origin with σ = {c['sigma']:.4f}, the L2 penalty of the "
        f"training loss read as a prior (σ = 1/sqrt(l2 · n_train), as the paper's code did; not "
        f"the N(0, 1/fan_in) initialisation). Prior term log10 ρ(θ0)/ρ(0) = "
        f"{summary['log10_prior_at_anchor']:.2f} for every estimate. \"Hessian (paper's Vᵀ "
        f"only)\" applies the full-Hessian preconditioner as the paper's code did, "
        f"diag(p) Vᵀ u; \"Hessian V diag(p) Vᵀ\" applies it correctly (REPLICATION.md §7.2)."
    )


def training_curves(history: list[dict] | pd.DataFrame) -> plt.Figure:
    """Loss and accuracy per epoch on the training and held-out images."""
    df = pd.DataFrame(history)
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), layout="constrained")
    for split in ("train", "heldout"):
        axes[0].plot(df["epoch"], df[f"{split}_loss"], label=split)
        axes[1].plot(df["epoch"], df[f"{split}_accuracy"], label=split)
    axes[0].set(xlabel="epoch", ylabel="mean cross-entropy (nats)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="accuracy")
    axes[1].legend()
    return fig


def _savefig(fig: plt.Figure, path: str | Path, dpi: int) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        # A fixed creation date keeps the PDF identical between runs.
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else {"Software": None}
        fig.savefig(tmp, format=path.suffix[1:], dpi=dpi, metadata=metadata)


def plot_stage(
    *,
    estimates_path: str,
    samples_path: str,
    figure_png: str,
    figure_pdf: str,
    table_csv: str,
    table_md: str,
    bins: int,
    dpi: int,
    width: float,
    height: float,
) -> dict[str, Any]:
    """Run the ``plot_mlp`` stage. Returns {"figure": Figure, "table": DataFrame,
    "caption": str}."""
    summary = json.loads(Path(estimates_path).read_text())
    with np.load(samples_path) as z:
        samples = {k: z[k] for k in z.files if k.endswith("__samples")}
    fig = figure1(summary, samples, bins=bins, width=width, height=height)
    _savefig(fig, figure_png, dpi)
    _savefig(fig, figure_pdf, dpi)
    table = aggregates_table(summary)
    with atomic_path(table_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    caption = figure1_caption(summary)
    shown = table.drop(columns=["name"]).rename(columns={"preconditioner": "estimate"})
    markdown = (
        "# Figure 1 aggregates (digits MLP)\n\n"
        + shown.to_markdown(index=False, floatfmt=".2f")
        + "\n\nlog10 values; `log10_prior_term` = −|θ0|²/(2σ² ln 10), the Gaussian density "
        "ratio ρ(θ0)/ρ(0) at the anchor; `log10_neighbourhood` = aggregate − prior term "
        "(REPLICATION.md §7.5).\n\n" + caption + "\n"
    )
    with atomic_path(table_md) as tmp:
        tmp.write_text(markdown)
    return {"figure": fig, "table": table, "caption": caption}
