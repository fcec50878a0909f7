"""Clean vs poisoned: per estimator and term, the spread across training seeds and whether the
conditions separate (docs/experiments.md#poisoned-digits).

The unit of replication is the training seed: each condition has one estimate per seed, so the
spread between seeds (a different network each) is what a difference must beat, not the Monte
Carlo spread of one network's samples.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["TERMS", "ACCURACIES", "comparison", "accuracy_table", "verdict"]

TERMS = ("log10_volume", "log10_prior_at_anchor", "log10_neighbourhood")
ACCURACIES = ("train_accuracy", "heldout_accuracy", "poison_accuracy")


def _separation(clean: np.ndarray, poisoned: np.ndarray) -> str:
    if poisoned.max() < clean.min():
        return "poisoned smaller"
    if poisoned.min() > clean.max():
        return "poisoned larger"
    return "overlap"


def _row(clean: np.ndarray, poisoned: np.ndarray) -> dict:
    """Means, sample standard deviations (ddof 1; NaN for one seed), the difference of means,
    an exact two-sided permutation test of it over all splits of the pooled seeds, and whether
    every poisoned value lies below (or above) every clean one."""
    if len(clean) > 1 and len(poisoned) > 1:
        p = stats.permutation_test((poisoned, clean), lambda a, b: a.mean() - b.mean(),
                                   permutation_type="independent", n_resamples=np.inf,
                                   alternative="two-sided").pvalue
    else:
        p = float("nan")
    return {"clean_mean": clean.mean(), "clean_std": clean.std(ddof=1) if len(clean) > 1 else np.nan,
            "poisoned_mean": poisoned.mean(),
            "poisoned_std": poisoned.std(ddof=1) if len(poisoned) > 1 else np.nan,
            "difference": poisoned.mean() - clean.mean(), "permutation_p": float(p),
            "separation": _separation(clean, poisoned), "n_clean": len(clean),
            "n_poisoned": len(poisoned)}


def comparison(records: dict[str, dict]) -> pd.DataFrame:
    """One row per (estimator, term) of :data:`TERMS` (log10), from the final records of
    ``estimate_poison_digits`` (each with ``estimator``, ``condition``, ``training_seed``):
    :func:`_row`'s columns. Raises ValueError if a condition has no record of an estimator."""
    frame = pd.DataFrame([{"estimator": r["estimator"], "label": r["label"],
                           "condition": r["condition"], **{t: r[t] for t in TERMS}}
                          for r in records.values()])
    rows = []
    for estimator, group in frame.groupby("estimator", sort=False):
        by = {c: group[group["condition"] == c] for c in ("clean", "poisoned")}
        if any(len(g) == 0 for g in by.values()):
            raise ValueError(f"estimator {estimator!r} lacks a clean or a poisoned record")
        for term in TERMS:
            rows.append({"estimator": estimator, "label": group["label"].iloc[0], "term": term,
                         **_row(by["clean"][term].to_numpy(float),
                                by["poisoned"][term].to_numpy(float))})
    return pd.DataFrame(rows)


def accuracy_table(train_rows: dict[str, dict]) -> pd.DataFrame:
    """One row per accuracy of :data:`ACCURACIES` (train = the clean split, poison = the poison
    split with its true labels, held-out = the KL cost's images) and the parameter norm, from
    ``train_poison_digits``'s metrics (network -> row): :func:`_row`'s columns."""
    frame = pd.DataFrame(train_rows.values())
    rows = []
    for column in (*ACCURACIES, "param_norm"):
        rows.append({"quantity": column,
                     **_row(frame[frame["condition"] == "clean"][column].to_numpy(float),
                            frame[frame["condition"] == "poisoned"][column].to_numpy(float))})
    return pd.DataFrame(rows)


def verdict(table: pd.DataFrame) -> list[str]:
    """One plain sentence per estimator: is the poisoned networks' log10 volume smaller than
    the clean ones' beyond the seed-to-seed spread (no overlap of the two sets of seeds), and
    is the gap in the prior term or the neighbourhood term."""
    lines = []
    for estimator, group in table.groupby("estimator", sort=False):
        row = {r["term"]: r for _, r in group.iterrows()}
        vol, prior, hood = (row[t] for t in TERMS)
        if vol["separation"] == "poisoned smaller":
            head = "poisoned volumes are smaller than every clean one"
        elif vol["separation"] == "poisoned larger":
            head = "poisoned volumes are LARGER than every clean one"
        else:
            head = "the poisoned and clean volumes overlap across seeds"
        share = (f"prior term {prior['difference']:+.1f}, neighbourhood term "
                 f"{hood['difference']:+.1f}")
        lines.append(f"{vol['label']}: {head} (difference of means {vol['difference']:+.1f} "
                     f"log10, seed spread {vol['clean_std']:.1f} clean / "
                     f"{vol['poisoned_std']:.1f} poisoned, permutation p = "
                     f"{vol['permutation_p']:.3g}); {share}.")
    return lines
