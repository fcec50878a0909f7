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

__all__ = ["figure1", "figure1_caption", "training_curves", "plot_stage", "pythia_plot_stage",
           "convnext_plot_stage"]

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
                 stat="probability", element="step", fill=False, linewidth=1.3, ax=ax)
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
        f"aggregated estimates (logsumexp − log k); in N = {c['n_params']:,} dimensions they sit "
        f"at the largest sample (paper eq. 13), far right of each histogram's bulk. Cost: mean KL from the anchor over the "
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


# ---------------------------------------------------------------------------------------------
# Shared by the experiment plot stages (Pythia, ConvNeXt): records -> table, files
# ---------------------------------------------------------------------------------------------

_TERMS_NOTE = ("log10 values; `log10_prior_term` = −|θ0|²/(2σ² ln 10); `log10_neighbourhood` = "
               "aggregate − prior term (REPLICATION.md §7.5).")


def estimates_table(summary: dict, *, keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per stored estimate (localvol.records.run_estimate): ``key``, the record fields
    named in ``keys`` (e.g. figure, series, step), then cutoff, k, the aggregate, its prior and
    neighbourhood terms (log10), the largest sample, the anchor RMS and cost evaluations per
    sample (wall times are in the stage's ``*.timings.json``, outside DVC)."""
    rows = []
    for key, r in summary["estimates"].items():
        rows.append({"key": key, **{k: r[k] for k in keys}, "cutoff": r["cutoff"],
                     "k": r["n_samples"], "log10_volume": r["log10_volume"],
                     "log10_prior_term": r["log10_prior_at_anchor"],
                     "log10_neighbourhood": r["log10_neighbourhood"],
                     "max_sample_log10": r["max_sample_log10"], "anchor_rms": r["anchor_rms"],
                     "cost_evaluations_per_sample": r["cost_evaluations_per_sample"]})
    return pd.DataFrame(rows)


def _read_estimates(estimates_path: str, samples_path: str) -> tuple[dict, dict[str, np.ndarray]]:
    summary = json.loads(Path(estimates_path).read_text())
    with np.load(samples_path) as z:
        samples = {k: z[k] for k in z.files if k.endswith("__samples")}
    return summary, samples


def _write_outputs(figs: dict[str, tuple[plt.Figure, str]], dpi: int, table: pd.DataFrame,
                   table_csv: str, table_md: str, markdown: str) -> None:
    """Each figure as PNG (the given path) and PDF beside it; the table as CSV; the Markdown."""
    for fig, png in figs.values():
        _savefig(fig, png, dpi)
        _savefig(fig, Path(png).with_suffix(".pdf"), dpi)
    with atomic_path(table_csv) as tmp:
        table.to_csv(tmp, index=False, float_format="%.8g")
    with atomic_path(table_md) as tmp:
        tmp.write_text(markdown)


# ---------------------------------------------------------------------------------------------
# Pythia across training: Figures 2, 4 and 6 (stage plot_pythia; localvol.pythia)
# ---------------------------------------------------------------------------------------------


def pythia_table(summary: dict) -> pd.DataFrame:
    """One row per Pythia estimate (:func:`estimates_table` with figure, series, step)."""
    return estimates_table(summary, keys=("figure", "series", "step"))


def figure_histograms(summary: dict, samples: dict[str, np.ndarray], figure: int, *,
                      bins: int, width: float, height: float) -> plt.Figure:
    """:func:`figure1`'s per-sample histograms for the estimates whose record has
    ``figure == figure`` (labelled by their ``series``)."""
    keys = [k for k, r in summary["estimates"].items() if r["figure"] == figure]
    sub = {"estimates": {k: {"label": summary["estimates"][k]["series"],
                             "log10_volume": summary["estimates"][k]["log10_volume"]}
                         for k in keys}}
    return figure1(sub, samples, bins=bins, width=width, height=height)


def pythia_figure2(summary: dict, samples: dict[str, np.ndarray], *, bins: int = 10,
                   width: float = 8.0, height: float = 4.0) -> plt.Figure:
    """Figure 2: per-sample histograms at the final checkpoint with dashed aggregates."""
    fig = figure_histograms(summary, samples, 2, bins=bins, width=width, height=height)
    fig.axes[0].set_title(f"step {summary['config']['steps'][-1]} (final), "
                          f"N = {summary['config']['n_params']:,}")
    return fig


def pythia_figure4(summary: dict, *, width: float = 11.0, height: float = 4.0) -> plt.Figure:
    """Figure 4: aggregate log10 probability at every checkpoint (left) and its split into the
    prior term −|θ0|²/(2σ² ln 10) and the neighbourhood term (right; REPLICATION.md §7.5).
    Steps on a log axis (step 0 drawn at 0.5)."""
    df = pythia_table(summary)
    df = df[df["figure"] == 4].copy()
    df["x"] = df["step"].where(df["step"] > 0, 0.5)
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 2, figsize=(width, height), layout="constrained")
    for series, g in df.groupby("series", sort=False):
        axes[0].plot(g["x"], g["log10_volume"], marker="o", label=series)
        axes[1].plot(g["x"], g["log10_neighbourhood"], marker="o", label=f"neighbourhood, {series}")
    prior = df.drop_duplicates("step")
    axes[1].plot(prior["x"], prior["log10_prior_term"], color="k", linestyle="--", marker=".",
                 label="prior term −|θ0|²/(2σ²)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training step (0 plotted at 0.5)")
    axes[0].set_ylabel("log10 probability (aggregate)")
    axes[1].set_ylabel("log10 (terms of the aggregate)")
    axes[0].legend()
    axes[1].legend(fontsize="small")
    return fig


def cutoff_sweep(df: pd.DataFrame, n_params: int, reference: pd.DataFrame, *,
                 width: float = 7.0, height: float = 4.5) -> tuple[plt.Figure, plt.Axes]:
    """Aggregate log10 probability vs cutoff, one line per ``series`` of ``df`` (rows of
    :func:`estimates_table`), with the reference line of slope N/2 (log10 per decade of
    cutoff: the volume of an N-dimensional quadratic basin grows as cutoff^(N/2)) through the
    middle cutoff of the ``reference`` rows. Log x axis."""
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


def pythia_figure6(summary: dict, *, width: float = 7.0, height: float = 4.5) -> plt.Figure:
    """Figure 6: :func:`cutoff_sweep` at the final checkpoint, the slope-N/2 line through the
    naive estimate, and the prior term."""
    df = pythia_table(summary)
    df = df[df["figure"] == 6]
    fig, ax = cutoff_sweep(df, summary["config"]["n_params"], df[df["series"] == "naive"],
                           width=width, height=height)
    ax.axhline(df["log10_prior_term"].iloc[0], color="grey", linestyle=":", label="prior term")
    ax.legend(fontsize="small")
    return fig


def pythia_caption(summary: dict) -> str:
    c, t = summary["config"], summary["eval_tokens"]
    src = ("a scaled-down Pythia-architecture GPT-NeoX trained here on pydoc_data.topics (local "
           "source; NOT EleutherAI's Pythia-31M)" if c["source"] == "local" else
           "EleutherAI/pythia-31m hub checkpoints")
    return (
        f"Pythia replication ({src}; N = {c['n_params']:,} parameters, steps {c['steps']}). "
        f"Cost: mean KL from the checkpoint over {t['n_real_tokens']:,} real tokens of "
        f"{c['n_eval_docs']} evaluation documents ({t['n_padding_tokens']:,} padding positions "
        f"excluded), float32. Prior N(0, σ²I), σ = {c['sigma']:.5g} = RMS of the step-0 "
        f"parameters. Adam ν from {c['adam_source']}, ε = {c['adam_eps']:g}, exponent "
        f"{c['exponent']:g}. Figure 2: k = {c['k_histogram']}; Figure 4: k = "
        f"{c['k_checkpoints']} per point; Figure 6: k = {c['k_cutoffs']} per point. Plotted: "
        f"aggregates logsumexp − log k (not the largest sample, REPLICATION.md §7.4)."
    )


def pythia_plot_stage(*, estimates_path: str, samples_path: str, figure2_png: str,
                      figure4_png: str, figure6_png: str, table_csv: str, table_md: str,
                      bins: int, dpi: int) -> dict[str, Any]:
    """Run the ``plot_pythia`` stage: Figures 2, 4, 6 (PNG and PDF beside it), the table of
    all aggregates (CSV, Markdown with caption and the squared-gradient comparison)."""
    summary, samples = _read_estimates(estimates_path, samples_path)
    figs = {"figure2": (pythia_figure2(summary, samples, bins=bins), figure2_png),
            "figure4": (pythia_figure4(summary), figure4_png),
            "figure6": (pythia_figure6(summary), figure6_png)}
    table = pythia_table(summary)
    caption = pythia_caption(summary)
    comparison = summary.get("squared_gradient_comparison") or {}
    comp = "".join(f"- {k}: {v:.6g}\n" if isinstance(v, float) else f"- {k}: {v}\n"
                   for k, v in comparison.items())
    markdown = (
        "# Pythia aggregates (Figures 2, 4, 6)\n\n"
        + table.drop(columns=["key"]).to_markdown(index=False, floatfmt=".6g")
        + "\n\n" + _TERMS_NOTE + "\n\n" + caption + "\n"
        + (f"\n## Squared-gradient ν vs the true Adam ν (final checkpoint)\n\n{comp}" if comp else "")
    )
    _write_outputs(figs, dpi, table, table_csv, table_md, markdown)
    return {"figures": {k: f for k, (f, _) in figs.items()}, "table": table, "caption": caption}


# ---------------------------------------------------------------------------------------------
# ConvNeXt V2 Atto on CIFAR-10, clean and poisoned: Figures 3, 5 and 7 (stage plot_convnext)
# ---------------------------------------------------------------------------------------------


def convnext_table(summary: dict) -> pd.DataFrame:
    """One row per ConvNeXt estimate (:func:`estimates_table` with figure, run, series, step,
    dtype of the KL evaluation)."""
    return estimates_table(summary, keys=("figure", "run", "series", "step", "dtype"))


def _data_label(summary: dict) -> str:
    src = summary["config"]["source"]
    return "CIFAR-10, JPEG copy" if src.startswith("JPEG copy") else "CIFAR-10"


def convnext_figure3(summary: dict, samples: dict[str, np.ndarray], *, bins: int = 10,
                     width: float = 9.0, height: float = 4.0) -> plt.Figure:
    """Figure 3: per-sample histograms at the final checkpoint (clean and poisoned, naive and
    Adam ν) with dashed aggregates."""
    fig = figure_histograms(summary, samples, 3, bins=bins, width=width, height=height)
    fig.axes[0].set_title(f"ConvNeXt V2 Atto, {_data_label(summary)}: step "
                          f"{summary['config']['steps'][-1]} (final), N = {summary['config']['n_params']:,}")
    return fig


def convnext_figure5(summary: dict, *, width: float = 11.0, height: float = 8.0) -> plt.Figure:
    """Figure 5: aggregate log10 probability at every checkpoint (top left), its prior and
    neighbourhood terms (top right, REPLICATION.md §7.5), and the training curves, accuracy and
    loss on the fixed clean, poison and validation subsets (bottom). Steps on a log axis."""
    df = convnext_table(summary)
    df = df[df["figure"] == 5]
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(2, 2, figsize=(width, height), layout="constrained", sharex=True)
    (a, b), (c, d) = axes
    for series, g in df.groupby("series", sort=False):
        a.plot(g["step"], g["log10_volume"], marker="o", label=series)
        b.plot(g["step"], g["log10_neighbourhood"], marker="o", label=f"neighbourhood, {series}")
    for run, g in df.drop_duplicates(["run", "step"]).groupby("run", sort=False):
        b.plot(g["step"], g["log10_prior_term"], linestyle="--", color="k" if run == "clean" else "grey",
               marker=".", label=f"prior term, {run}")
    styles = {"clean": "-", "poisoned": "--"}
    for run, r in summary["config"]["runs"].items():
        h = pd.DataFrame(r["history"])
        h = h[h["step"] > 0]
        for subset, color in zip(("clean", "poison", "val"), sns.color_palette("tab10", 3)):
            kw = dict(color=color, linestyle=styles.get(run, ":"), marker=".")
            c.plot(h["step"], h[f"{subset}_accuracy"], label=f"{run} net, {subset} images", **kw)
            d.plot(h["step"], h[f"{subset}_loss"], label=f"{run} net, {subset} images", **kw)
    a.set_ylabel("log10 probability (aggregate)")
    b.set_ylabel("log10 (terms of the aggregate)")
    c.set_ylabel("accuracy")
    d.set_ylabel("cross-entropy (nats)")
    for ax in axes.flat:
        ax.set_xscale("log")
    for ax in (c, d):
        ax.set_xlabel("training step")
    a.legend(fontsize="small")
    b.legend(fontsize="x-small")
    c.legend(fontsize="x-small")
    a.set_title(f"ConvNeXt V2 Atto, {_data_label(summary)}")
    return fig


def convnext_figure7(summary: dict, *, width: float = 7.0, height: float = 4.5) -> plt.Figure:
    """Figure 7: :func:`cutoff_sweep` at the final checkpoint (four series), the slope-N/2 line
    through the first run's naive estimate, and each run's prior term (dotted)."""
    df = convnext_table(summary)
    df = df[df["figure"] == 7]
    first = df["run"].iloc[0]
    fig, ax = cutoff_sweep(df, summary["config"]["n_params"],
                           df[df["key"].str.startswith(f"cutoff_{first}_naive")],
                           width=width, height=height)
    for _, g in df.groupby("run", sort=False):
        ax.axhline(g["log10_prior_term"].iloc[0], color="grey", linestyle=":", linewidth=0.8)
    ax.set_title(f"ConvNeXt V2 Atto, {_data_label(summary)} (dotted: prior terms)")
    ax.legend(fontsize="small")
    return fig


def convnext_caption(summary: dict) -> str:
    c = summary["config"]
    runs = ", ".join(f"{k} (poison probability {v['poison_probability']:g})" for k, v in c["runs"].items())
    return (
        f"ConvNeXt V2 Atto (N = {c['n_params']:,}) on {c['source']}"
        + (" — results from the JPEG copy are not bit-comparable to the original CIFAR-10"
           if c["source"].startswith("JPEG copy") else "")
        + f". Runs: {runs}; checkpoints at steps {c['steps']}. Cost: mean KL from the "
        f"checkpoint over {c['n_eval']} test images, float32 (float64 for cutoffs below "
        f"{c.get('float64_below', 0):g}). Prior N(0, σ²I), σ = "
        f"{c['sigma']:.5g} = RMS of the initial parameters. Adam ν preconditioner, ε = "
        f"{c['adam_eps']:g}, exponent {c['exponent']:g}. Figure 3: k = {c['k_histogram']}; "
        f"Figure 5: k = {c['k_checkpoints']} per point; Figure 7: k = {c['k_cutoffs']} per point. "
        "Plotted: aggregates logsumexp − log k (not the largest sample, REPLICATION.md §7.4)."
    )


def convnext_plot_stage(*, estimates_path: str, samples_path: str, figure3_png: str,
                        figure5_png: str, figure7_png: str, table_csv: str, table_md: str,
                        bins: int, dpi: int) -> dict[str, Any]:
    """Run the ``plot_convnext`` stage: Figures 3, 5, 7 (PNG and PDF beside it) and the table
    of all aggregates (CSV; Markdown with the caption and the final training metrics)."""
    summary, samples = _read_estimates(estimates_path, samples_path)
    figs = {"figure3": (convnext_figure3(summary, samples, bins=bins), figure3_png),
            "figure5": (convnext_figure5(summary), figure5_png),
            "figure7": (convnext_figure7(summary), figure7_png)}
    table = convnext_table(summary)
    final = pd.DataFrame([{"run": run, **r["history"][-1]} for run, r in summary["config"]["runs"].items()])
    caption = convnext_caption(summary)
    markdown = (
        f"# ConvNeXt aggregates (Figures 3, 5, 7; {_data_label(summary)})\n\n"
        + table.drop(columns=["key"]).to_markdown(index=False, floatfmt=".6g")
        + "\n\n" + _TERMS_NOTE + "\n\n## Final checkpoint, training metrics\n\n"
        + final.to_markdown(index=False, floatfmt=".4g") + "\n\n" + caption + "\n"
    )
    _write_outputs(figs, dpi, table, table_csv, table_md, markdown)
    return {"figures": {k: f for k, (f, _) in figs.items()}, "table": table, "caption": caption}
