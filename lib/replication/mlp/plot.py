"""Figure 1 of the paper (the digits MLP under every preconditioner) and its aggregates table.

:func:`plot_stage` is the ``plot_figure1`` stage as a plain function: it reads the
``estimate_figure1`` results and writes Figure 1 (PNG and PDF) and the aggregates table (CSV,
and Markdown with the figure caption) into ``figures/``.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from replication.plots.histograms import sample_histograms
from replication.plots.outputs import TERMS_NOTE, read_estimates, savefig, write_table
from replication.sweep import summary_table

__all__ = ["figure1", "figure1_caption", "aggregates_table", "plot_stage"]


def figure1(summary: dict, samples: dict[str, np.ndarray], *, bins: int = 40,
            width: float = 10.0, height: float = 4.5) -> plt.Figure:
    """Per-sample histograms of log10 probability, one colour per estimate (legend: its
    ``label``), with a dashed vertical line at each aggregate (logsumexp − log k), as the
    paper's Figure 1. ``summary`` is the estimates JSON; ``samples`` maps ``<key>__samples`` to
    (k,) per-sample log terms in nats. ``width``, ``height`` in inches."""
    entries = [(r["label"], r["log10_volume"], samples[f"{key}__samples"])
               for key, r in summary["estimates"].items()]
    return sample_histograms(entries, bins=bins, width=width, height=height)


def figure1_caption(summary: dict) -> str:
    """The caption: model size, k, cost, cutoff, prior and the two Hessian applications."""
    c = summary["config"]
    k_pre = c["n_samples_preconditioned"]
    return (
        f"Figure 1 (replication). Local volume of the digits MLP (N = {c['n_params']:,} "
        f"parameters): histograms of per-sample log10 probability (naive k = "
        f"{c['n_samples_naive']:,}, each preconditioner k = {k_pre:,}); dashed lines are the "
        f"aggregated estimates (logsumexp − log k); in N = {c['n_params']:,} dimensions they sit "
        f"at the largest sample (paper eq. 13), far right of each histogram's bulk. Cost: mean "
        f"KL from the anchor over the "
        f"{c['n_heldout']} held-out images, cutoff {c['cutoff']:g} nats. Measure: Gaussian "
        f"N(0, σ²I) centred at the origin with σ = {c['sigma']:.4f}, the L2 penalty of the "
        f"training loss read as a prior (σ = 1/sqrt(l2 · n_train), as the paper's code did; not "
        f"the N(0, 1/fan_in) initialisation). Prior term log10 ρ(θ0)/ρ(0) = "
        f"{summary['log10_prior_at_anchor']:.2f} for every estimate. \"Hessian (paper's Vᵀ "
        f"only)\" applies the full-Hessian preconditioner as the paper's code did, "
        f"diag(p) Vᵀ u; \"Hessian V diag(p) Vᵀ\" applies it correctly "
        f"(docs/authors-code.md#hessian-mis-application)."
    )


def aggregates_table(summary: dict) -> pd.DataFrame:
    """:func:`replication.sweep.summary_table` of the estimates, with each estimate's legend
    ``label`` and its median sample (log10, after the largest): one row per estimate. (Wall
    times, which change from run to run, stay in the stage's ``*.timings.json`` so that the
    table is reproducible.)"""
    table = summary_table(summary["estimates"], columns=("label", "median_sample_log10"))
    columns = [c for c in table.columns if c != "median_sample_log10"]
    columns.insert(columns.index("max_sample_log10") + 1, "median_sample_log10")
    return table[columns]


def plot_stage(*, estimates_path: str, samples_path: str, figure_png: str, figure_pdf: str,
               table_csv: str, table_md: str, bins: int, dpi: int, width: float,
               height: float) -> dict[str, Any]:
    """Run the ``plot_figure1`` stage: Figure 1 (``bins`` per histogram, ``width`` × ``height``
    inches, ``dpi`` for the PNG) as PNG and PDF, the aggregates table as CSV and Markdown (with
    the caption). Returns {"figure": Figure, "table": DataFrame, "caption": str}."""
    summary, samples = read_estimates(estimates_path, samples_path)
    fig = figure1(summary, samples, bins=bins, width=width, height=height)
    savefig(fig, figure_png, dpi)
    savefig(fig, figure_pdf, dpi)
    table = aggregates_table(summary)
    caption = figure1_caption(summary)
    shown = table.drop(columns=["key", "cutoff"]).rename(columns={"label": "estimate"})
    markdown = ("# Figure 1 aggregates (digits MLP)\n\n"
                + shown.to_markdown(index=False, floatfmt=".2f")
                + "\n\n" + TERMS_NOTE + "\n\n" + caption + "\n")
    write_table(table, table_csv, table_md, markdown, float_format="%.6g")
    return {"figure": fig, "table": table, "caption": caption}
