"""Writing figures and tables: atomically, and byte-identically across reruns (no dates)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from replication.pipeline.files import atomic_path, read_json

__all__ = ["TERMS_NOTE", "savefig", "write_figures", "write_table", "read_estimates"]

TERMS_NOTE = ("log10 values; `log10_prior_term` = −|θ0|²/(2σ² ln 10), the Gaussian density ratio "
              "ρ(θ0)/ρ(0) at the anchor; `log10_neighbourhood` = aggregate − prior term "
              "(docs/authors-code.md#prior-dominated-interpretation).")


def savefig(fig: plt.Figure, path: str | Path, dpi: int) -> None:
    """Save ``fig`` as ``path`` (format from the suffix) atomically, without a creation date or
    software version, so a rerun writes the same bytes."""
    path = Path(path)
    with atomic_path(path) as tmp:
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else {"Software": None}
        fig.savefig(tmp, format=path.suffix[1:], dpi=dpi, metadata=metadata)


def write_figures(figures: dict[str, tuple[plt.Figure, str]], dpi: int) -> None:
    """Each figure as PNG (the given path) and as PDF beside it."""
    for fig, png in figures.values():
        savefig(fig, png, dpi)
        savefig(fig, Path(png).with_suffix(".pdf"), dpi)


def write_table(table: pd.DataFrame, table_csv: str | Path, table_md: str | Path, markdown: str,
                float_format: str = "%.8g") -> None:
    """The table as CSV and the given Markdown text (which should contain the table)."""
    with atomic_path(table_csv) as tmp:
        table.to_csv(tmp, index=False, float_format=float_format)
    with atomic_path(table_md) as tmp:
        Path(tmp).write_text(markdown)


def read_estimates(estimates_path: str | Path, samples_path: str | Path | None = None
                   ) -> tuple[dict, dict[str, np.ndarray]]:
    """(estimates JSON, ``{key}__samples`` arrays) of an estimate stage."""
    summary = read_json(estimates_path)
    samples = {}
    if samples_path is not None:
        with np.load(samples_path) as z:
            samples = {k: z[k] for k in z.files if k.endswith("__samples")}
    return summary, samples
