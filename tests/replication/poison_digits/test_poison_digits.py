"""Clean vs poisoned digits MLPs (replication.poison_digits): the split, the training, the
pilot-selected estimates, the comparison and the plot, on tiny networks."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ruamel.yaml import YAML

from replication.mlp import data
from replication.poison_digits import compare, estimate, plot, train

REPO = Path(__file__).resolve().parents[3]
TRAIN = dict(split_seed=1, n_poison=256, poison_probability=0.5, hidden=4, lr=0.05, steps=30,
             batch_size=64, l2=5e-4, betas=[0.9, 0.999], adam_eps=1e-8)


def test_poison_split_is_a_seeded_partition():
    clean, poison = train.poison_split(1024, 256, seed=1)
    assert len(poison) == 256 and len(clean) == 768
    assert sorted(np.concatenate([clean, poison]).tolist()) == list(range(1024))
    again = train.poison_split(1024, 256, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (clean, poison)))
    assert not np.array_equal(train.poison_split(1024, 256, seed=2)[1], poison)
    for bad in (0, 1024, 2.5):
        with pytest.raises(ValueError, match=r"train_poison_digits.n_poison must be an integer"):
            train.poison_split(1024, bad, seed=1)


def test_a_clean_network_never_sees_the_poison_split():
    """Probability 0: the same network whatever the poison split holds (the sampler's clean
    draws do not depend on it); probability > 0: another network."""
    g = np.random.default_rng(0)
    images = g.random((40, 64), dtype=np.float32)
    labels = g.integers(0, 10, 40)
    clean_idx = np.arange(30)
    kw = dict(seed=3, hidden=4, lr=0.05, steps=5, batch_size=8, l2=5e-4, betas=(0.9, 0.999),
              adam_eps=1e-8)
    a = train.train_network(images, labels, clean_idx, np.arange(30, 40), poison_probability=0.0, **kw)
    b = train.train_network(images, labels, clean_idx, np.arange(35, 40), poison_probability=0.0, **kw)
    c = train.train_network(images, labels, clean_idx, np.arange(30, 40), poison_probability=0.5, **kw)
    for p, q, r in zip(a.model.parameters(), b.model.parameters(), c.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert any(not torch.equal(p, r) for p, r in zip(a.model.parameters(), c.model.parameters()))
    with pytest.raises(ValueError, match=r"poison_probability must be in \[0, 1\)"):
        train.train_network(images, labels, clean_idx, np.arange(30, 40), poison_probability=1.0, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two clean and two poisoned 64 → 4 → 10 MLPs (310 parameters) with the split, on disk."""
    root = tmp_path_factory.mktemp("poison")
    data.write_raw_data(root / "data")
    data.split_stage(data_dir=str(root / "data"), split_path=str(root / "split.npz"), seed=0,
                     n_train=1024)
    rows = train.train_stage(data_dir=str(root / "data"), split_path=str(root / "split.npz"),
                             models_dir=str(root / "models"), metrics_path=str(root / "tm.json"),
                             table_path=str(root / "networks.csv"), seeds=[0, 1], progress=False,
                             **TRAIN)
    return root, rows


def test_train_stage_writes_every_network_and_its_accuracies(trained):
    root, rows = trained
    assert [r["network"] for r in rows] == ["clean-seed0", "clean-seed1", "poisoned-seed0",
                                           "poisoned-seed1"]
    metrics = json.loads((root / "tm.json").read_text())
    assert set(metrics) == {r["network"] for r in rows}
    for r in rows:
        assert (root / "models" / r["network"] / "model.safetensors").exists()
        assert r["poison_probability"] == (0.0 if r["condition"] == "clean" else 0.5)
        assert r["n_parameters"] == 310
    # the poisoned networks are trained to get the poison split wrong
    by = {r["network"]: r for r in rows}
    for s in (0, 1):
        assert by[f"poisoned-seed{s}"]["poison_accuracy"] < by[f"clean-seed{s}"]["poison_accuracy"]
    with pytest.raises(ValueError, match="seeds must be distinct integers"):
        train.train_stage(data_dir="x", split_path="x", models_dir="x", metrics_path="x",
                          table_path="x", seeds=[0, 0], **TRAIN)


SPECS = {"diag": {"kind": "diag_hessian", "eps": [1e-3, 1e-1], "exponents": [0.25, 0.5]},
         "h": {"kind": "hessian", "eps": 1e-2, "exponents": 0.5}}


def test_units_pilot_every_grid_point_and_estimate_the_choice():
    specs = estimate.check_preconditioners(SPECS)
    assert specs["h"] == {"kind": "hessian", "eps": [1e-2], "exponents": [0.5]}
    pilots = estimate.pilot_units(["clean-seed0"], specs, cutoff=0.01, n_pilot=8, pilot_seed=7)
    assert len(pilots) == 4  # the 2 × 2 grid of diag; h has one point: no pilot
    assert {(u.eps, u.exponent) for u in pilots} == {(1e-3, 0.25), (1e-1, 0.25), (1e-3, 0.5), (1e-1, 0.5)}
    assert all(u.seed == 7 and u.n_samples == 8 and u.preconditioner == "diag_hessian" for u in pilots)
    finals = estimate.final_units(["clean-seed0"], specs, {("clean-seed0", "diag"): (1e-1, 0.25)},
                                  cutoff=0.01, n_samples=20)
    assert [u.key for u in finals] == ["clean-seed0/naive", "clean-seed0/diag", "clean-seed0/h"]
    assert [(u.eps, u.exponent) for u in finals[1:]] == [(1e-1, 0.25), (1e-2, 0.5)]
    assert all(u.seed is None and u.n_samples == 20 for u in finals)  # the sweep's seed


@pytest.mark.parametrize("change, message", [
    ({"naive": {"kind": "adam_nu", "eps": 1.0, "exponents": 0.5}}, "reserved"),
    ({"a": {"kind": "adam_nu", "eps": 1.0}}, "exactly the keys kind, eps and exponents"),
    ({"a": {"kind": "fisher", "eps": 1.0, "exponents": 0.5}}, "kind 'fisher' unknown"),
    ({"a": {"kind": "adam_nu", "eps": [1.0, 1.0], "exponents": 0.5}}, r"preconditioners.a.eps must be"),
    ({"a": {"kind": "adam_nu", "eps": -1.0, "exponents": 0.5}}, r"preconditioners.a.eps must be"),
    ({"a": {"kind": "adam_nu", "eps": 1.0, "exponents": [0.0]}}, r"preconditioners.a.exponents must be"),
])
def test_bad_preconditioners_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        estimate.check_preconditioners(change)


def _stage(root, out, **over):
    params = dict(data_dir=str(root / "data"), split_path=str(root / "split.npz"),
                  models_dir=str(root / "models"), estimates_path=str(out / "e.json"),
                  samples_path=str(out / "s.npz"), progress_dir=str(out / "progress"),
                  metrics_path=str(out / "m.json"), seeds=[0, 1], cutoff=1e-3, sigma=1.4,
                  rtol=1e-2, seed=5, pilot_seed=6, n_samples=12, n_pilot=6, batch_size=8,
                  preconditioners=SPECS, progress=False)
    return {**params, **over}


def test_estimate_stage_selects_on_the_pilot_and_reports_fresh_directions(trained, tmp_path):
    root, _ = trained
    summary = estimate.estimate_stage(**_stage(root, tmp_path))
    recs, pilots = summary["estimates"], summary["pilots"]
    assert len(recs) == 4 * 3 and not (tmp_path / "progress").exists()
    with np.load(tmp_path / "s.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for net in ("clean-seed0", "clean-seed1", "poisoned-seed0", "poisoned-seed1"):
        cands = pilots[net]["diag"]["candidates"]
        best = max(cands, key=lambda c: c["pilot_log10_volume"])
        assert best["chosen"] and sum(c["chosen"] for c in cands) == 1
        rec = recs[f"{net}/diag"]
        assert (rec["eps"], rec["exponent"]) == (best["eps"], best["exponent"])
        assert pilots[net]["diag"]["chosen"] == {"eps": best["eps"], "exponent": best["exponent"]}
        assert rec["n_samples"] == 12 and rec["condition"] == net.split("-")[0]
        # the estimate's directions are not the pilot's: its first sample differs from the
        # chosen pilot's first sample (same anchor, cost and preconditioner)
        key = f"{net}/pilot/diag/eps={best['eps']:g},exponent={best['exponent']:g}"
        assert arrays[f"{key}__samples"].shape == (6,)
        assert arrays[f"{key}__samples"][0] != arrays[f"{net}/diag__samples"][0]
        assert "h" not in pilots[net]  # one grid point: nothing to choose
        # the label names the estimator, not one network's choice
        assert rec["label"] == "diag(H), ε and exponent chosen"
        assert recs[f"{net}/h"]["label"] == "Hessian V diag(p) Vᵀ, ε=1e-2, exponent 0.5"
        terms = rec["log10_prior_at_anchor"] + rec["log10_neighbourhood"]
        assert terms == pytest.approx(rec["log10_volume"], abs=1e-9)


@pytest.mark.parametrize("change, message", [
    ({"seed": 3, "pilot_seed": 3}, r"estimate_poison_digits.pilot_seed \(3\) must differ"),
    ({"seed": -1}, r"estimate_poison_digits.seed must be an integer in \[0, 2\^32\)"),
    ({"rtol": 5.0}, r"estimate_poison_digits.rtol must be in \(0, 1\)"),
    ({"sigma": float("inf")}, r"estimate_poison_digits.sigma must be a finite number"),
    ({"seeds": []}, r"train_poison_digits.seeds must be distinct"),
    ({"seeds": [0, 0]}, r"train_poison_digits.seeds must be distinct"),
    ({"preconditioners": {"a": {"kind": "adam_nu", "eps": [float("inf")], "exponents": 0.5}}},
     r"preconditioners.a.eps must be"),
])
def test_estimate_stage_refuses_bad_settings_before_reading_files(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        estimate.estimate_stage(**_stage(tmp_path / "nowhere", tmp_path, **change))


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, r"train_poison_digits.steps must be an integer ≥ 1"),
    ({"lr": 0.0}, r"train_poison_digits.lr must be > 0"),
    ({"hidden": 0}, r"train_poison_digits.hidden"),
    ({"poison_probability": 0.0}, r"train_poison_digits.poison_probability must be in \(0, 1\)"),
])
def test_train_stage_names_its_own_keys(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train.train_stage(data_dir="x", split_path="x", models_dir="x", metrics_path="x",
                          table_path="x", seeds=[0], **{**TRAIN, **change})


@pytest.mark.slow
def test_estimate_stage_on_two_and_three_processes_writes_the_same_results(trained, tmp_path):
    """Every rank gathers the pilots and chooses alike, then the estimates are dealt out and
    merged: the same bytes for 2 and 3 ranks (one thread each; against one process the
    cost's float32 sums may round differently, docs: README.md, "Many processes")."""
    from replication.scale import run_stage

    root, _ = trained
    out = {}
    for processes in (2, 3):
        folder = tmp_path / f"p{processes}"
        run_stage(estimate.estimate_stage, {**_stage(root, folder), "processes": processes})
        with np.load(folder / "s.npz") as z:
            out[processes] = ((folder / "e.json").read_bytes(), {k: z[k] for k in z.files})
        assert not (folder / "progress").exists()
    assert out[2][0] == out[3][0]
    assert out[2][1].keys() == out[3][1].keys() and len(out[2][1]) == 5 * (12 + 4 * 4)
    for key, value in out[2][1].items():
        np.testing.assert_array_equal(out[3][1][key], value, err_msg=key)


def _records(clean, poisoned):
    recs = {}
    for condition, values in (("clean", clean), ("poisoned", poisoned)):
        for s, (vol, prior) in enumerate(values):
            recs[f"{condition}-seed{s}/naive"] = {
                "estimator": "naive", "label": "naive", "condition": condition,
                "training_seed": s, "log10_volume": vol, "log10_prior_at_anchor": prior,
                "log10_neighbourhood": vol - prior}
    return recs


def test_comparison_spread_separation_and_exact_permutation_p():
    table = compare.comparison(_records([(-10, -1), (-11, -1), (-12, -1)],
                                        [(-20, -2), (-21, -2), (-22, -2)]))
    vol = table[table["term"] == "log10_volume"].iloc[0]
    assert vol["clean_mean"] == -11 and vol["poisoned_mean"] == -21 and vol["difference"] == -10
    assert vol["clean_std"] == pytest.approx(1.0) and vol["separation"] == "poisoned smaller"
    # 3 vs 3 completely separated: 2 of the C(6, 3) = 20 splits are as extreme (two-sided)
    assert vol["permutation_p"] == pytest.approx(2 / 20)
    # paired by seed: the differences -10, -10, -10; of the 2^3 sign flips, 2 are as extreme
    assert vol["paired_p"] == pytest.approx(2 / 8) and vol["paired_difference_std"] == 0
    prior = table[table["term"] == "log10_prior_at_anchor"].iloc[0]
    assert prior["difference"] == -1 and math.isnan(prior["clean_std"]) is False
    hood = table[table["term"] == "log10_neighbourhood"].iloc[0]
    assert hood["difference"] == -9
    lines = compare.verdict(table)
    assert len(lines) == 1 and "smaller than every clean one" in lines[0]
    assert "prior term -1.0, neighbourhood term -9.0" in lines[0] and "sign-flip p = 0.25" in lines[0]
    mixed = compare.comparison(_records([(-10, -1), (-20, -1)], [(-15, -1), (-16, -1)]))
    assert mixed.iloc[0]["separation"] == "overlap"
    assert "overlap" in compare.verdict(mixed)[0]
    with pytest.raises(ValueError, match="lacks a clean or a poisoned record"):
        compare.comparison(_records([(-10, -1)], []))


def test_plot_stage_writes_the_figure_and_the_table(trained, tmp_path):
    root, _ = trained
    estimate.estimate_stage(**_stage(root, tmp_path))
    files = {k: tmp_path / v for k, v in {"figure_png": "f.png", "figure_pdf": "f.pdf",
                                          "table_csv": "t.csv", "table_md": "t.md"}.items()}
    table = plot.plot_stage(estimates_path=str(tmp_path / "e.json"),
                            train_metrics_path=str(root / "tm.json"),
                            **{k: str(v) for k, v in files.items()}, dpi=30, width=8.0, height=4.0)
    assert all(f.stat().st_size > 0 for f in files.values())
    assert list(pd.read_csv(files["table_csv"])["estimator"].unique()) == ["naive", "diag", "h"]
    md = files["table_md"].read_text()
    assert "## Verdicts" in md and md.count("\n- ") == 3 and "heldout_accuracy" in md
    assert len(table) == 9


def test_params_yaml_section_is_valid():
    params = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    specs = estimate.check_preconditioners(params["estimate_poison_digits"]["preconditioners"])
    assert {s["kind"] for s in specs.values()} == {"diag_hessian", "adam_nu", "hessian"}
    assert params["estimate_poison_digits"]["seed"] != params["estimate_poison_digits"]["pilot_seed"]
