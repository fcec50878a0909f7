"""Stage ``plot_pythia`` (:func:`plot_stage`): the paper's Figures 2, 4 and 6 for Pythia
(docs/experiments.md#pythia, docs/authors-code.md#script-slips,
docs/authors-code.md#prior-dominated-interpretation) from the three estimate stages' results, and
the table of all their aggregates (CSV, and Markdown with the caption and the squared-gradient
comparison)."""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from replication.plots.cutoffs import cutoff_sweep
from replication.plots.histograms import sample_histograms
from replication.plots.outputs import TERMS_NOTE, read_estimates, write_figures, write_table
from replication.plots.training import aggregates_across_training, prior_terms_across_training
from replication.sweep import summary_table

__all__ = ["table", "figure2", "figure4", "figure6", "caption", "plot_stage"]

COLUMNS = ("figure", "series", "step", "anchor_rms")


def table(*summaries: dict) -> pd.DataFrame:
    """One row per estimate of the given estimates JSONs, in order
    (:func:`replication.sweep.summary_table` with figure, series, step, anchor RMS)."""
    return pd.concat([summary_table(s["estimates"], COLUMNS) for s in summaries], ignore_index=True)


def figure2(summary: dict, samples: dict[str, np.ndarray], *, bins: int = 10, width: float = 8.0,
            height: float = 4.0) -> plt.Figure:
    """Figure 2: per-sample histograms (log10) at the final checkpoint, one per series, with
    dashed aggregates. ``samples``: ``{key}__samples`` (k,) nats."""
    entries = [(r["series"], r["log10_volume"], samples[f"{key}__samples"])
               for key, r in summary["estimates"].items()]
    fig = sample_histograms(entries, bins=bins, width=width, height=height)
    fig.axes[0].set_title(f"step {summary['config']['steps'][-1]} (final), "
                          f"N = {summary['config']['n_params']:,}")
    return fig


def figure4(summary: dict, *, width: float = 11.0, height: float = 4.0) -> plt.Figure:
    """Figure 4: aggregate log10 probability at every checkpoint (left) and its split into the
    prior term −|θ0|²/(2σ² ln 10) and the neighbourhood term (right;
    docs/authors-code.md#prior-dominated-interpretation).
    Steps on a log axis (step 0 drawn at 0.5)."""
    df = table(summary)
    df["x"] = df["step"].where(df["step"] > 0, 0.5)
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(width, height), layout="constrained")
    aggregates_across_training(df, axes[0], axes[1], x="x")
    prior_terms_across_training(df, axes[1], x="x")
    for ax in axes:
        ax.set_xlabel("training step (0 plotted at 0.5)")
    axes[0].legend()
    axes[1].legend(fontsize="small")
    return fig


def figure6(summary: dict, *, width: float = 7.0, height: float = 4.5) -> plt.Figure:
    """Figure 6: aggregate log10 probability against the cutoff at the final checkpoint, one
    line per series, the slope-N/2 line through the naive estimate, and the prior term."""
    df = table(summary)
    fig, ax = cutoff_sweep(df, summary["config"]["n_params"], df[df["series"] == "naive"],
                           width=width, height=height)
    ax.axhline(df["log10_prior_term"].iloc[0], color="grey", linestyle=":", label="prior term")
    ax.legend(fontsize="small")
    return fig


def caption(figure2_summary: dict, figure4_summary: dict, figure6_summary: dict) -> str:
    """The figures' caption: source, N, steps, evaluation tokens, σ, the Adam ν settings and
    each figure's k (from the estimate stages' configs)."""
    c, t = figure4_summary["config"], figure4_summary["eval_tokens"]
    c2, c6 = figure2_summary["config"], figure6_summary["config"]
    src = ("a scaled-down Pythia-architecture GPT-NeoX trained here on pydoc_data.topics (local "
           "source; NOT EleutherAI's Pythia-31M)" if c["source"] == "local" else
           "EleutherAI/pythia-31m hub checkpoints")
    eps6 = ", ".join(f"{e:g}" for e in c6["adam_eps"])
    return (
        f"Pythia replication ({src}; N = {c['n_params']:,} parameters, steps {c['steps']}). "
        f"Cost: mean KL from the checkpoint over {t['n_real_tokens']:,} real tokens of "
        f"{c['n_eval_docs']} evaluation documents ({t['n_padding_tokens']:,} padding positions "
        f"excluded), float32. Prior N(0, σ²I), σ = {c['sigma']:.5g} = RMS of the step-0 "
        f"parameters. Adam ν from {c['adam_source']}, exponent {c['exponent']:g}. Figure 2: "
        f"cutoff {c2['cutoff']:g} nats, ε = {c2['adam_eps']:g}, k = {c2['k']}; Figure 4: cutoff "
        f"{c['cutoff']:g} nats, ε = {c['adam_eps']:g}, k = {c['k']} per point; Figure 6: ε = "
        f"{eps6}, k = {c6['k']} per point. Plotted: aggregates logsumexp − log k (not the "
        f"largest sample, docs/authors-code.md#script-slips)."
    )


def _comparison_markdown(comparison: dict) -> str:
    lines = "".join(f"- {k}: {v:.6g}\n" if isinstance(v, float) else f"- {k}: {v}\n"
                    for k, v in comparison.items())
    if not lines:
        return ""
    return f"\n## Squared-gradient ν vs the true Adam ν (final checkpoint)\n\n{lines}"


def plot_stage(*, figure2_estimates: str, figure2_samples: str, figure4_estimates: str,
               figure6_estimates: str, figure2_png: str, figure4_png: str, figure6_png: str,
               table_csv: str, table_md: str, bins: int, dpi: int) -> dict[str, Any]:
    """Run the ``plot_pythia`` stage: Figures 2, 4, 6 (PNG at the given paths, PDF beside
    each), the table of all aggregates (CSV; Markdown with the caption and the squared-gradient
    comparison). ``bins``: Figure 2 histogram bins; ``dpi``: PNG resolution.

    Returns {"figures": {"figure2": Figure, ...}, "table": DataFrame, "caption": str}."""
    fig2, samples = read_estimates(figure2_estimates, figure2_samples)
    fig4, _ = read_estimates(figure4_estimates)
    fig6, _ = read_estimates(figure6_estimates)
    figures = {"figure2": (figure2(fig2, samples, bins=bins), figure2_png),
               "figure4": (figure4(fig4), figure4_png),
               "figure6": (figure6(fig6), figure6_png)}
    write_figures(figures, dpi)
    rows = table(fig4, fig2, fig6)
    text = caption(fig2, fig4, fig6)
    markdown = ("# Pythia aggregates (Figures 2, 4, 6)\n\n"
                + rows.drop(columns=["key"]).to_markdown(index=False, floatfmt=".6g")
                + "\n\n" + TERMS_NOTE + "\n\n" + text + "\n"
                + _comparison_markdown(fig2.get("squared_gradient_comparison") or {}))
    write_table(rows, table_csv, table_md, markdown)
    return {"figures": {k: f for k, (f, _) in figures.items()}, "table": rows, "caption": text}
