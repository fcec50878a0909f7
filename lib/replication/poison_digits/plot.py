"""The clean-vs-poisoned digits figure and table (stage ``plot_poison_digits``;
docs/experiments.md#poisoned-digits).

Figure: top row, one panel per estimator: the log10 volume of every network (points, one per
training seed) and each condition's mean (a bar); bottom row, the same for the neighbourhood
term; last column, the accuracies (top) and the prior term (bottom), which depends on the
network alone. Table: :func:`replication.poison_digits.compare.comparison` and
:func:`~replication.poison_digits.compare.accuracy_table` with the verdicts, as CSV and Markdown.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from replication.pipeline.files import read_json
from replication.plots.outputs import savefig, write_table
from replication.poison_digits.compare import accuracy_table, comparison, verdict

__all__ = ["poison_figure", "poison_markdown", "plot_stage"]

PALETTE = {"clean": "tab:blue", "poisoned": "tab:red"}


def _records_frame(summary: dict) -> pd.DataFrame:
    return pd.DataFrame([{"estimator": r["estimator"], "label": r["label"],
                          "condition": r["condition"], "seed": r["training_seed"],
                          "log10_volume": r["log10_volume"],
                          "log10_neighbourhood": r["log10_neighbourhood"],
                          "log10_prior_at_anchor": r["log10_prior_at_anchor"]}
                         for r in summary["estimates"].values()])


def _strip(ax, frame: pd.DataFrame, x: str, y: str) -> None:
    """Points per seed and a bar at each condition's mean."""
    order = [c for c in PALETTE if c in set(frame["condition"])]
    sns.stripplot(frame, x=x, y=y, hue="condition", palette=PALETTE, order=None if x != "condition" else order,
                  hue_order=order, dodge=x != "condition", jitter=False, size=4, ax=ax,
                  legend=False)  # no jitter: it draws from numpy's global RNG (a rerun would differ)
    sns.pointplot(frame, x=x, y=y, hue="condition", palette=PALETTE, hue_order=order,
                  order=None if x != "condition" else order, dodge=0.4 if x != "condition" else False,
                  errorbar=None, markers="_", markersize=18, linestyle="none", ax=ax, legend=False)


def poison_figure(summary: dict, train_rows: dict[str, dict], *, width: float = 13.0,
                  height: float = 6.0) -> plt.Figure:
    """The figure (see the module docstring) from the estimates JSON of
    ``estimate_poison_digits`` and the metrics of ``train_poison_digits`` (network -> row)."""
    frame = _records_frame(summary)
    estimators = list(dict.fromkeys(frame["estimator"]))
    fig, axes = plt.subplots(2, len(estimators) + 1, figsize=(width, height), layout="constrained")
    for col, name in enumerate(estimators):
        sub = frame[frame["estimator"] == name]
        for row, (term, what) in enumerate((("log10_volume", "log10 volume"),
                                            ("log10_neighbourhood", "log10 neighbourhood term"))):
            ax = axes[row, col]
            _strip(ax, sub, "condition", term)
            ax.set_xlabel("")
            ax.set_ylabel(what if col == 0 else "")
            if row == 0:
                ax.set_title(sub["label"].iloc[0], fontsize=9)
    acc = pd.DataFrame(train_rows.values()).melt(
        id_vars=["condition"], value_vars=["train_accuracy", "heldout_accuracy", "poison_accuracy"],
        var_name="split", value_name="accuracy")
    acc["split"] = acc["split"].str.removesuffix("_accuracy").replace({"train": "train (clean)"})
    _strip(axes[0, -1], acc, "split", "accuracy")
    axes[0, -1].set_title("accuracy (poison split: true labels)", fontsize=9)
    axes[0, -1].set_xlabel("")
    axes[0, -1].tick_params(axis="x", labelsize=8)
    prior = frame.drop_duplicates(["condition", "seed"])
    _strip(axes[1, -1], prior, "condition", "log10_prior_at_anchor")
    axes[1, -1].set_ylabel("log10 prior term")
    axes[1, -1].set_xlabel("")
    axes[1, -1].set_title("prior term (per network)", fontsize=9)
    cfg = summary["config"]
    fig.suptitle(f"Clean (blue) vs poisoned (red) digits MLPs: {len(cfg['seeds'])} training seeds "
                 f"each (points; bar = mean), cutoff {cfg['cutoff']:g} nats, k = "
                 f"{cfg['n_samples']:,}, ε and exponent chosen on {cfg['n_pilot']} pilot "
                 "directions", fontsize=10)
    return fig


def poison_markdown(table: pd.DataFrame, accuracies: pd.DataFrame, summary: dict) -> str:
    """The Markdown file: the verdicts, the comparison and the accuracies, and each network's
    chosen ε and exponent."""
    cfg = summary["config"]
    lines = ["# Clean vs poisoned digits MLPs", "",
             f"{len(cfg['seeds'])} training seeds per condition; cutoff {cfg['cutoff']:g} nats, "
             f"k = {cfg['n_samples']:,} directions per estimate (seed {cfg['seed']}), ε and "
             f"exponent chosen on {cfg['n_pilot']} pilot directions (seed {cfg['pilot_seed']}) "
             "that no estimate reuses. log10 values; std across seeds (ddof 1); p: exact "
             "two-sided permutation test of the difference of means over all splits of the "
             "seeds; separation: whether every poisoned value lies below (above) every clean "
             "one. Produced by `dvc repro` (stage plot_poison_digits).", "", "## Verdicts", ""]
    lines += [f"- {line}" for line in verdict(table)]
    lines += ["", "## Local volume and its terms", "",
              table.to_markdown(index=False, floatfmt=".4g"), "",
              "## Accuracies and parameter norm", "",
              accuracies.to_markdown(index=False, floatfmt=".4g"), "", "## Chosen ε and exponent", ""]
    rows = [{"network": net, "estimator": name, "eps": c["chosen"]["eps"],
             "exponent": c["chosen"]["exponent"]}
            for net, by in summary["pilots"].items() for name, c in by.items()]
    lines += [pd.DataFrame(rows).to_markdown(index=False) if rows else "(no grid)", ""]
    return "\n".join(lines)


def plot_stage(*, estimates_path: str, train_metrics_path: str, figure_png: str, figure_pdf: str,
               table_csv: str, table_md: str, dpi: int, width: float, height: float) -> pd.DataFrame:
    """The ``plot_poison_digits`` stage: the figure (PNG and PDF) and the table (CSV of the
    comparison, Markdown with verdicts and accuracies). Returns the comparison table."""
    summary = read_json(estimates_path)
    train_rows = read_json(train_metrics_path)
    table = comparison(summary["estimates"])
    accuracies = accuracy_table(train_rows)
    fig = poison_figure(summary, train_rows, width=width, height=height)
    savefig(fig, figure_png, dpi)
    savefig(fig, figure_pdf, dpi)
    plt.close(fig)
    write_table(table, table_csv, table_md, poison_markdown(table, accuracies, summary),
                float_format="%.6g")
    return table
