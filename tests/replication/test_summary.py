"""The end-of-run summary: the rerun spread (bootstrap std of the aggregate) against an exact
enumeration, and the per-figure tables built from estimate records."""

import itertools
import math

import numpy as np
import pytest
from scipy.special import logsumexp

from replication.summary import figure_table, rerun_spread_log10, summary_markdown


def exact_bootstrap_std_log10(samples: np.ndarray) -> float:
    """The bootstrap distribution enumerated: all k^k equally likely resamples."""
    k = samples.size
    aggregates = [logsumexp(samples[list(idx)]) - math.log(k)
                  for idx in itertools.product(range(k), repeat=k)]
    return float(np.std(aggregates) / math.log(10))


@pytest.mark.parametrize("samples", [[-3.0, -1.0, -2.5], [-1000.0, -10.0, -10.5, -700.0],
                                     [0.0, -50.0]])
def test_rerun_spread_matches_the_enumerated_bootstrap(samples):
    x = np.array(samples)
    exact = exact_bootstrap_std_log10(x)
    assert exact > 0
    assert rerun_spread_log10(x, n_resamples=200_000) == pytest.approx(exact, rel=0.02)


def test_rerun_spread_of_two_far_apart_samples_is_the_closed_form():
    """k = 2, samples a ≫ b (nats): the aggregate is a with prob. 1/4 ({a,a}), a − log 2 with
    1/2 ({a,b}), b with 1/4 ({b,b}); its std follows from those three values."""
    a, b = 0.0, -400.0
    values = np.array([a, a - math.log(2), b])
    p = np.array([0.25, 0.5, 0.25])
    mean = p @ values
    std = math.sqrt(p @ (values - mean) ** 2) / math.log(10)
    assert rerun_spread_log10(np.array([a, b]), n_resamples=400_000) == pytest.approx(std, rel=0.01)


def test_rerun_spread_edge_cases():
    assert rerun_spread_log10(np.array([-5.0])) == 0.0
    assert rerun_spread_log10(np.full(7, -3.0)) == pytest.approx(0.0, abs=1e-12)
    assert rerun_spread_log10(np.array([-5.0, np.inf, np.nan])) == 0.0  # one finite sample
    with pytest.raises(ValueError, match="no finite samples"):
        rerun_spread_log10(np.array([np.nan]))
    x = np.array([-1.0, -4.0, -2.0])
    assert rerun_spread_log10(x) == rerun_spread_log10(x)  # seeded: reproducible


def _record(figure, series, log10_volume, k, **fields):
    return {"figure": figure, "series": series, "log10_volume": log10_volume, "n_samples": k,
            **fields}


def test_figure_tables_pivot_steps_and_runs():
    rng = np.random.default_rng(0)
    estimates = {"estimates": {
        "a0": _record(5, "clean, naive", -2_000_000.4, 2, run="clean", step=1),
        "b0": _record(5, "clean, Adam ν ε=1e-05", -1_000_000.0, 2, run="clean", step=1),
        "a1": _record(5, "poisoned, naive", -3_000_000.0, 2, run="poisoned", step=1),
        "b1": _record(5, "poisoned, Adam ν ε=1e-05", -1_500_000.0, 2, run="poisoned", step=1),
    }}
    samples = {f"{key}__samples": rng.normal(-1e6, 1e4, size=2) for key in estimates["estimates"]}
    table = figure_table(5, estimates, samples)
    assert list(table.columns) == ["run", "step", "naive", "Adam ν ε=1e-05"]
    assert list(table["run"]) == ["clean", "poisoned"]
    spread = rerun_spread_log10(samples["a0__samples"])
    assert table.loc[0, "naive"] == f"-2,000,000 ± {spread:,.0f}"


def test_figure_table_of_one_checkpoint_lists_each_estimate():
    estimates = {"estimates": {
        "naive": _record(1, "naive", -4493.12, 3),
        "diag": _record(1, "diag(H), ε=1e-2", -3520.6, 3),
    }}
    samples = {"naive__samples": np.array([-1.0, -2.0, -3.0]) * 1e4,
               "diag__samples": np.array([-1.0, -1.0, -1.0]) * 1e4}
    table = figure_table(1, estimates, samples)
    assert list(table["estimate"]) == ["naive", "diag(H), ε=1e-2"]
    assert table.loc[1, "log10 volume ± rerun"] == "-3,521 ± 0"


def test_summary_names_stages_not_yet_run(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "vars:\n  - paths:\n" + "".join(
            f"      fig{n}_{kind}: results/fig{n}/{kind}\n" for n in range(1, 8)
            for kind in ("estimates", "samples")) + "stages: {}\n")
    text = summary_markdown(tmp_path / "dvc.yaml")
    assert text.count("not run yet") == 8 and "(figures/poison_digits.md missing)" in text and "dvc metrics diff --md" in text


def test_summary_names_what_is_missing_or_unreadable(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "vars:\n  - paths:\n" + "".join(
            f"      fig{n}_{kind}: fig{n}_{kind}\n" for n in range(1, 8)
            for kind in ("estimates", "samples")) + "stages: {}\n")
    (tmp_path / "fig1_estimates").write_text('{"estimates": {"naive": {"figure": 1, '
                                             '"series": "naive", "log10_volume": -1.0, '
                                             '"n_samples": 2}}}')
    (tmp_path / "fig2_estimates").write_text('{"estimates": {}}')
    np.savez(tmp_path / "fig2_samples.npz", x=np.zeros(2))
    (tmp_path / "fig2_samples.npz").rename(tmp_path / "fig2_samples")
    text = summary_markdown(tmp_path / "dvc.yaml")
    assert "not run yet (fig1_samples missing)" in text  # names the file that is missing
    assert "could not read fig2_estimates with fig2_samples: ValueError: no estimates" in text


def test_summary_ends_with_the_poisoned_digits_verdicts(tmp_path):
    (tmp_path / "dvc.yaml").write_text("vars:\n  - paths:\n      poison_md: p.md\n" + "".join(
        f"      fig{n}_{kind}: fig{n}_{kind}\n" for n in range(1, 8)
        for kind in ("estimates", "samples")) + "stages: {}\n")
    (tmp_path / "p.md").write_text("# T\n\nintro\n\n## Verdicts\n\n- naive: smaller.\n- diag: overlap.\n\n"
                                   "## Local volume\n\n| table |\n")
    text = summary_markdown(tmp_path / "dvc.yaml")
    assert "- naive: smaller.\n- diag: overlap.\n\nTable: p.md" in text and "| table |" not in text
