"""Clean vs poisoned: per estimator and term, the spread across training seeds and whether the
conditions separate (docs/experiments.md#poisoned-digits).

The unit of replication is the training seed: each condition has one estimate per seed, so the
spread between seeds (a different network each) is what a difference must beat, not the Monte
Carlo spread of one network's samples.
"""
from __future__ import annotations

import math

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


def _row(clean: np.ndarray, poisoned: np.ndarray, paired: bool) -> dict:
    """Means, sample standard deviations (ddof 1; NaN for one seed), the difference of means,
    an exact two-sided permutation test of it over all splits of the pooled seeds
    (``permutation_p``), whether every poisoned value lies below (or above) every clean one,
    and, when the two arrays are paired by training seed (same order), the paired differences'
    standard deviation and an exact two-sided sign-flip test (``paired_p``; with 5 pairs it
    cannot go below 2/32 = 0.0625)."""
    def test(kind):
        # exact over every arrangement while there are at most 10^5 of them, else 10^5 draws
        n = (2 ** len(clean) if kind == "samples"
             else math.comb(len(clean) + len(poisoned), len(clean)))
        return float(stats.permutation_test(
            (poisoned, clean), lambda a, b, axis=-1: (a - b).mean(axis) if kind == "samples"
            else a.mean(axis) - b.mean(axis), permutation_type=kind,
            n_resamples=np.inf if n <= 10**5 else 10**5, alternative="two-sided",
            vectorized=True, random_state=0).pvalue)

    diff = poisoned - clean if paired else None
    return {"clean_mean": clean.mean(), "clean_std": clean.std(ddof=1) if len(clean) > 1 else np.nan,
            "poisoned_mean": poisoned.mean(),
            "poisoned_std": poisoned.std(ddof=1) if len(poisoned) > 1 else np.nan,
            "difference": poisoned.mean() - clean.mean(),
            "permutation_p": test("independent") if len(clean) > 1 and len(poisoned) > 1 else np.nan,
            "separation": _separation(clean, poisoned),
            "paired_difference_std": diff.std(ddof=1) if paired and len(diff) > 1 else np.nan,
            "paired_p": test("samples") if paired and len(diff) > 1 else np.nan,
            "n_clean": len(clean), "n_poisoned": len(poisoned)}


def _pair(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(clean values, poisoned values, paired): sorted by training seed; paired when both
    conditions have the same seeds."""
    by = {c: frame[frame["condition"] == c].sort_values("seed") for c in ("clean", "poisoned")}
    paired = by["clean"]["seed"].tolist() == by["poisoned"]["seed"].tolist()
    return by["clean"][column].to_numpy(float), by["poisoned"][column].to_numpy(float), paired


def comparison(records: dict[str, dict]) -> pd.DataFrame:
    """One row per (estimator, term) of :data:`TERMS` (log10), from the final records of
    ``estimate_poison_digits`` (each with ``estimator``, ``condition``, ``training_seed``):
    :func:`_row`'s columns. Raises ValueError if a condition has no record of an estimator."""
    frame = pd.DataFrame([{"estimator": r["estimator"], "label": r["label"],
                           "condition": r["condition"], "seed": r["training_seed"],
                           **{t: r[t] for t in TERMS}} for r in records.values()])
    rows = []
    for estimator, group in frame.groupby("estimator", sort=False):
        if set(group["condition"]) != {"clean", "poisoned"}:
            raise ValueError(f"estimator {estimator!r} lacks a clean or a poisoned record")
        for term in TERMS:
            rows.append({"estimator": estimator, "label": group["label"].iloc[0], "term": term,
                         **_row(*_pair(group, term))})
    return pd.DataFrame(rows)


def accuracy_table(train_rows: dict[str, dict]) -> pd.DataFrame:
    """One row per accuracy of :data:`ACCURACIES` (train = the clean split, poison = the poison
    split with its true labels, held-out = the KL cost's images) and the parameter norm, from
    ``train_poison_digits``'s metrics (network -> row): :func:`_row`'s columns."""
    frame = pd.DataFrame(train_rows.values())
    return pd.DataFrame([{"quantity": column, **_row(*_pair(frame, column))}
                         for column in (*ACCURACIES, "param_norm")])


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
                     f"{vol['poisoned_std']:.1f} poisoned; permutation p = "
                     f"{vol['permutation_p']:.3g}, paired sign-flip p = {vol['paired_p']:.3g}); "
                     f"{share}.")
    return lines
