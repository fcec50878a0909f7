"""The end-of-run summary: one short Markdown table per figure, printed by ``make reproduce``.

Each entry is an aggregate log10 volume (logsumexp of the k per-sample log probabilities − log k,
paper eq. 11) with its **rerun spread**: the standard deviation of the same aggregate over
bootstrap resamples of the k samples. The aggregate is dominated by its largest sample (in N
dimensions the samples spread over many orders of magnitude), so a rerun that draws other
directions, or finds slightly different radii because the trained weights differ in their last
bits on another machine, moves it by about this much; a move several times larger points to a
broken run rather than noise. With k = 2 or 4 (the CPU-scale Pythia and ConvNeXt sweeps) the
spread itself is a rough figure.

    python -m replication.summary [--dvc-yaml dvc.yaml]

reads the estimates (``estimates.json``) and per-sample arrays (``samples.npz``) of the seven
figures' estimate stages at the paths ``dvc.yaml`` defines, and prints the tables (stages not yet
run are listed as missing), then the verdicts of the poisoned-digits experiment (from
``figures/poison_digits.md``). The full tables are the plot stages' ``figures/*_aggregates.md``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from replication.pipeline.files import read_json
from replication.pipeline.parameters import load_yaml

__all__ = ["rerun_spread_log10", "figure_table", "summary_markdown", "FIGURES"]

LN10 = math.log(10.0)

# figure: (title, estimates path var, samples path var, row field or None, which records)
FIGURES: dict[int, tuple[str, str, str, str | None]] = {
    1: ("Figure 1, digits MLP: preconditioners", "fig1_estimates", "fig1_samples", None),
    4: ("Figure 4, Pythia across training", "fig4_estimates", "fig4_samples", "step"),
    2: ("Figure 2, Pythia final checkpoint", "fig2_estimates", "fig2_samples", None),
    6: ("Figure 6, Pythia across cutoffs (nats)", "fig6_estimates", "fig6_samples", "cutoff"),
    5: ("Figure 5, ConvNeXt across training", "fig5_estimates", "fig5_samples", "step"),
    3: ("Figure 3, ConvNeXt clean vs poisoned", "fig3_estimates", "fig3_samples", None),
    7: ("Figure 7, ConvNeXt across cutoffs (nats)", "fig7_estimates", "fig7_samples", "cutoff"),
}


def rerun_spread_log10(samples: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard deviation (log10) of the aggregate logsumexp(samples) − log k.

    ``samples``: shape (k,), per-sample log probabilities in **nats** (``<key>__samples`` of a
    ``samples.npz``); non-finite entries are dropped. ``n_resamples`` resamples of size k with
    replacement, from ``numpy.random.default_rng(seed)`` (so the figure is reproducible). Returns
    0.0 for fewer than two samples or identical samples. Raises ValueError for an empty array."""
    x = np.asarray(samples, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("rerun_spread_log10: no finite samples")
    if x.size < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    aggregates = logsumexp(x[idx], axis=1) - math.log(x.size)
    return float(np.std(aggregates) / LN10)


def _cell(value: float, spread: float) -> str:
    digits = 0 if abs(value) >= 100 else 2
    return f"{value:,.{digits}f} ± {spread:,.{digits}f}"


def figure_table(figure: int, estimates: dict[str, Any], samples: Any) -> pd.DataFrame:
    """The compact table of one figure: rows are the figure's x axis (``step``, ``cutoff``, and
    ``run`` where records have one) or one row per series; cells are "log10 volume ± rerun
    spread" (:func:`rerun_spread_log10` of ``samples[f"{key}__samples"]``)."""
    _, _, _, row_field = FIGURES[figure]
    rows = []
    for key, r in estimates["estimates"].items():
        if r.get("figure", figure) != figure:
            continue
        cell = _cell(r["log10_volume"], rerun_spread_log10(samples[f"{key}__samples"]))
        rows.append({"run": r.get("run"), "row": r.get(row_field) if row_field else r["series"],
                     "series": r["series"], "k": r["n_samples"], "cell": cell})
    if not rows:
        raise ValueError(f"no estimates of Figure {figure}")
    df = pd.DataFrame(rows)
    if row_field is None:  # one row per estimate (series names already start with the run)
        out = df.rename(columns={"row": "estimate", "cell": "log10 volume ± rerun"})
        return out[["estimate", "k", "log10 volume ± rerun"]].reset_index(drop=True)
    index = ["run", "row"] if df["run"].notna().any() else ["row"]
    if "run" in index:  # ConvNeXt series names carry the run: drop it from the column names
        df["series"] = [s.split(", ", 1)[-1] for s in df["series"]]
    table = df.pivot_table(index=index, columns="series", values="cell", aggfunc="first",
                           sort=False)
    table = table.reset_index().rename(columns={"row": row_field})
    table.columns.name = None
    return table


def summary_markdown(dvc_yaml: str | Path = "dvc.yaml") -> str:
    """The end-of-run summary (Markdown) of every estimate stage found at ``dvc.yaml``'s paths
    (relative to the folder of ``dvc_yaml``)."""
    dvc_yaml = Path(dvc_yaml)
    paths = load_yaml(dvc_yaml)["vars"][0]["paths"]
    root = dvc_yaml.parent
    parts = ["## Summary: aggregate log10 volume ± rerun spread (bootstrap std of the aggregate)"]
    for figure, (title, est_var, smp_var, _) in FIGURES.items():
        missing = [paths[v] for v in (est_var, smp_var) if not (root / paths[v]).exists()]
        if missing:
            parts.append(f"### {title}\n\nnot run yet ({' and '.join(missing)} missing)")
            continue
        try:
            with np.load(root / paths[smp_var]) as samples:
                table = figure_table(figure, read_json(root / paths[est_var]), samples)
        except (KeyError, ValueError, OSError) as err:  # results from other code or truncated
            parts.append(f"### {title}\n\ncould not read {paths[est_var]} with "
                         f"{paths[smp_var]}: {type(err).__name__}: {err}")
            continue
        parts.append(f"### {title}\n\n{table.to_markdown(index=False)}")
    poison = root / paths.get("poison_md", "figures/poison_digits.md")
    title = "### Clean vs poisoned digits MLPs (beyond the paper): verdicts"
    if poison.exists():
        verdicts = poison.read_text().split("## Verdicts", 1)[-1].split("\n## ", 1)[0].strip()
        parts.append(f"{title}\n\n{verdicts}\n\nTable: {paths.get('poison_md')}; claims: docs/claims.md")
    else:
        parts.append(f"{title}\n\nnot run yet ({poison.relative_to(root)} missing)")
    parts.append(
        "Full tables: figures/*_aggregates.md. Compare with another run: "
        "`dvc metrics diff --md` (against the last commit) or `dvc exp show --only-changed --md`.")
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m replication.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dvc-yaml", default="dvc.yaml")
    args = parser.parse_args(argv)
    print(summary_markdown(args.dvc_yaml), end="")


if __name__ == "__main__":
    main()
