"""Figures 3, 5 and 7 of the clean and poisoned ConvNeXt V2 Atto and the table of every
aggregate (stage ``plot_convnext``, :func:`plot_stage`; paper §4.2; docs/experiments.md#convnext,
docs/authors-code.md#script-slips, docs/authors-code.md#prior-dominated-interpretation). Reads
the three estimate stages' outputs (:mod:`replication.convnext.estimate`)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from replication.plots import cutoffs, histograms, outputs, training
from replication.sweep import summary_table

__all__ = ["table", "data_label", "figure3", "figure5", "figure7", "caption", "plot_stage"]

COLUMNS = ("figure", "run", "series", "step", "dtype", "anchor_rms")


def table(*summaries: dict) -> pd.DataFrame:
    """One row per estimate of the given estimate-stage JSONs, in order
    (:func:`replication.sweep.summary_table` with figure, run, series, step, dtype of the KL
    evaluation and the anchor's RMS; log10 values)."""
    return pd.concat([summary_table(s["estimates"], COLUMNS) for s in summaries], ignore_index=True)


def data_label(summary: dict) -> str:
    """"CIFAR-10", or "CIFAR-10, JPEG copy" for results from the offline JPEG copy."""
    return "CIFAR-10, JPEG copy" if summary["config"]["source"].startswith("JPEG copy") else "CIFAR-10"


def _title(summary: dict) -> str:
    return f"ConvNeXt V2 Atto, {data_label(summary)}"


def figure3(summary: dict, samples: dict[str, np.ndarray], *, bins: int = 10,
            width: float = 9.0, height: float = 4.0) -> plt.Figure:
    """Figure 3: per-sample histograms at the final checkpoint (clean and poisoned, naive and
    Adam ν) with dashed aggregates. ``samples``: ``{key}__samples`` (k,) nats."""
    entries = [(r["series"], r["log10_volume"], samples[f"{key}__samples"])
               for key, r in summary["estimates"].items()]
    fig = histograms.sample_histograms(entries, bins=bins, width=width, height=height)
    c = summary["config"]
    fig.axes[0].set_title(f"{_title(summary)}: step {c['steps'][-1]} (final), N = {c['n_params']:,}")
    return fig


def _training_curves(runs: dict, accuracy: plt.Axes, loss: plt.Axes) -> None:
    """Accuracy and cross-entropy on the fixed clean, poison and validation subsets, per run."""
    styles = {"clean": "-", "poisoned": "--"}
    for run, r in runs.items():
        h = pd.DataFrame(r["history"])
        h = h[h["step"] > 0]
        for subset, color in zip(("clean", "poison", "val"), sns.color_palette("tab10", 3)):
            kw = dict(color=color, linestyle=styles.get(run, ":"), marker=".")
            accuracy.plot(h["step"], h[f"{subset}_accuracy"], label=f"{run} net, {subset} images", **kw)
            loss.plot(h["step"], h[f"{subset}_loss"], label=f"{run} net, {subset} images", **kw)
    accuracy.set_ylabel("accuracy")
    loss.set_ylabel("cross-entropy (nats)")


def figure5(summary: dict, *, width: float = 11.0, height: float = 8.0) -> plt.Figure:
    """Figure 5: aggregate log10 probability at every checkpoint (top left), its prior and
    neighbourhood terms (top right, docs/authors-code.md#prior-dominated-interpretation), and
    the training curves, accuracy and loss on the fixed clean, poison and validation subsets
    (bottom). Steps on a log axis."""
    df = table(summary)
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(2, 2, figsize=(width, height), layout="constrained", sharex=True)
    (a, b), (c, d) = axes
    training.aggregates_across_training(df, a, b)
    training.prior_terms_across_training(df, b, by="run")
    _training_curves(summary["config"]["runs"], c, d)
    for ax in axes.flat:
        ax.set_xscale("log")
    for ax in (c, d):
        ax.set_xlabel("training step")
    a.legend(fontsize="small")
    b.legend(fontsize="x-small")
    c.legend(fontsize="x-small")
    a.set_title(_title(summary))
    return fig


def figure7(summary: dict, *, width: float = 7.0, height: float = 4.5) -> plt.Figure:
    """Figure 7: :func:`replication.plots.cutoffs.cutoff_sweep` at the final checkpoint (four
    series), the slope-N/2 line through the first run's naive estimate, and each run's prior
    term (dotted)."""
    df = table(summary)
    first = df["run"].iloc[0]
    fig, ax = cutoffs.cutoff_sweep(df, summary["config"]["n_params"],
                           df[df["key"].str.startswith(f"cutoff_{first}_naive")],
                           width=width, height=height)
    for _, g in df.groupby("run", sort=False):
        ax.axhline(g["log10_prior_term"].iloc[0], color="grey", linestyle=":", linewidth=0.8)
    ax.set_title(f"{_title(summary)} (dotted: prior terms)")
    ax.legend(fontsize="small")
    return fig


def caption(fig3: dict, fig5: dict, fig7: dict) -> str:
    """The caption of the three figures, from the estimate stages' configs."""
    c = fig3["config"]
    runs = ", ".join(f"{k} (poison probability {v['poison_probability']:g})" for k, v in c["runs"].items())
    eps = sorted({s["config"]["adam_eps"] for s in (fig3, fig5, fig7)})
    return (
        f"ConvNeXt V2 Atto (N = {c['n_params']:,}) on {c['source']}"
        + (" — results from the JPEG copy are not bit-comparable to the original CIFAR-10"
           if c["source"].startswith("JPEG copy") else "")
        + f". Runs: {runs}; checkpoints at steps {c['steps']}. Cost: mean KL from the "
        f"checkpoint over {c['n_eval']} test images, float32 (float64 for cutoffs below "
        f"{c['float64_below']:g}). Prior N(0, σ²I), σ = "
        f"{c['sigma']:.5g} = RMS of the initial parameters. Adam ν preconditioner, ε = "
        f"{', '.join(f'{e:g}' for e in eps)}, exponent {c['exponent']:g}. Figure 3: k = "
        f"{c['k']}; Figure 5: k = {fig5['config']['k']} per point; Figure 7: k = "
        f"{fig7['config']['k']} per point. "
        "Plotted: aggregates logsumexp − log k (not the largest sample, "
        "docs/authors-code.md#script-slips)."
    )


def plot_stage(*, figure3_estimates: str, figure3_samples: str, figure5_estimates: str,
               figure7_estimates: str, figure3_png: str, figure5_png: str, figure7_png: str,
               table_csv: str, table_md: str, bins: int, dpi: int) -> dict:
    """Run the ``plot_convnext`` stage: Figures 3, 5, 7 (PNG, and PDF beside it; ``dpi``) from
    the estimate stages' JSONs (and Figure 3's per-sample NPZ; ``bins`` per histogram), and the
    table of all aggregates (CSV; Markdown with the caption and the final training metrics).
    Returns {"figures": {name: Figure}, "table": DataFrame, "caption": str}."""
    fig3, samples = outputs.read_estimates(figure3_estimates, figure3_samples)
    fig5, _ = outputs.read_estimates(figure5_estimates)
    fig7, _ = outputs.read_estimates(figure7_estimates)
    figs = {"figure3": (figure3(fig3, samples, bins=bins), figure3_png),
            "figure5": (figure5(fig5), figure5_png),
            "figure7": (figure7(fig7), figure7_png)}
    rows = table(fig5, fig3, fig7)
    final = pd.DataFrame([{"run": run, **r["history"][-1]} for run, r in fig3["config"]["runs"].items()])
    text = caption(fig3, fig5, fig7)
    markdown = (
        f"# ConvNeXt aggregates (Figures 3, 5, 7; {data_label(fig3)})\n\n"
        + rows.drop(columns=["key"]).to_markdown(index=False, floatfmt=".6g")
        + "\n\n" + outputs.TERMS_NOTE + "\n\n## Final checkpoint, training metrics\n\n"
        + final.to_markdown(index=False, floatfmt=".4g") + "\n\n" + text + "\n"
    )
    outputs.write_figures(figs, dpi)
    outputs.write_table(rows, table_csv, table_md, markdown)
    return {"figures": {k: f for k, (f, _) in figs.items()}, "table": rows, "caption": text}
