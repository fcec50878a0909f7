"""Figure 1: curvature (replication.mlp.curvature), the estimate stage (replication.mlp.estimate)
and its plot (replication.mlp.plot), on a tiny trained MLP."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ruamel.yaml import YAML

from replication.mlp import curvature, data, estimate, model, plot

REPO = Path(__file__).resolve().parents[3]


def test_labels_and_kinds():
    assert estimate.preconditioner_label("naive", None) == "naive"
    assert estimate.preconditioner_label("adam_nu", 1e-3) == "Adam ν, ε=1e-3"
    assert estimate.preconditioner_label("hessian", 0.1) == "Hessian V diag(p) Vᵀ, ε=1e-1"
    assert estimate.preconditioner_label("hesscale", 0.05) == "HesScale, ε=0.05"
    assert curvature.needed_curvature({"hessian", "adam_mu"}) == {
        "hessian_eigh", "hessian_diagonal", "adam_mu"}
    assert curvature.needed_curvature({"diag_hessian"}) == {"hessian_diagonal"}
    assert curvature.needed_curvature(set()) == set()
    with pytest.raises(ValueError, match="unknown preconditioner kind"):
        curvature.needed_curvature({"fisher"})
    assert estimate.KINDS is curvature.KINDS


def test_units_are_the_params_yaml_names_naive_first():
    """Record keys (and so the samples.npz array names) are exactly params.yaml's names."""
    params = YAML(typ="safe").load((REPO / "params.yaml").read_text())["estimate_figure1"]
    specs = estimate.check_preconditioners(params["preconditioners"])
    units = estimate.figure1_units(specs, cutoff=params["cutoff"], n_samples_naive=10000,
                                   n_samples_preconditioned=3000)
    assert [u.key for u in units] == ["naive", *params["preconditioners"]]
    assert [u.n_samples for u in units] == [10000] + [3000] * len(specs)
    naive, *rest = units
    assert (naive.preconditioner, naive.eps, naive.meta["kind"]) == ("naive", None, "naive")
    for u in rest:
        spec = params["preconditioners"][u.key]
        assert (u.preconditioner, u.eps) == (spec["kind"], spec["eps"])
        assert u.meta == {"kind": spec["kind"], "eps": spec["eps"], "label": u.series}
        assert u.cutoff == params["cutoff"] and not u.float64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained 64 → 4 → 10 MLP (310 parameters) with its split, on disk."""
    root = tmp_path_factory.mktemp("fig1")
    data.write_raw_data(root / "data")
    split = root / "split.npz"
    data.split_stage(data_dir=str(root / "data"), split_path=str(split), seed=0, n_train=1024)
    model.train_stage(data_dir=str(root / "data"), split_path=str(split),
                      model_dir=str(root / "model"), metrics_path=str(root / "tm.json"),
                      history_path=str(root / "h.csv"), seed=0, hidden=4, lr=0.05, epochs=2,
                      batch_size=64, l2=5e-4, betas=[0.9, 0.999], adam_eps=1e-8)
    return root


def test_curvature_and_preconditioners(tiny):
    parts = data.load_split_data(tiny / "data", tiny / "split.npz")
    mlp, opt = model.load_trained(tiny / "model")
    n = model.count_parameters(mlp)
    need = curvature.needed_curvature(set(curvature.KINDS))
    curv, times = curvature.compute_curvature(
        need, mlp, torch.as_tensor(parts["heldout_images"]),
        torch.as_tensor(parts["train_images"]), torch.as_tensor(parts["train_labels"]), opt)
    assert list(curv) == ["hessian_diagonal", "hessian_eigenvalues", "hessian_eigenvectors",
                          "hesscale", "adam_mu", "adam_nu"]  # the order of spectra.npz
    assert set(times) == {"hessian_s", "eigh_s", "hesscale_s"}
    V, lam = curv["hessian_eigenvectors"], curv["hessian_eigenvalues"]
    assert V.shape == (n, n) and V.dtype == torch.float64
    # one decomposition of the (symmetric, PSD Fisher) Hessian, consistent with its diagonal
    H = (V * lam) @ V.T
    torch.testing.assert_close(H.diagonal(), curv["hessian_diagonal"], rtol=1e-6, atol=1e-10)
    assert lam.min() > -1e-8 * lam.max()
    u = torch.randn(3, n, dtype=torch.float64)
    for kind in curvature.KINDS:
        p = curvature.build_preconditioner(kind, 1e-2, 0.5, curv)
        v = p.apply(u)
        assert v.shape == u.shape and torch.isfinite(v).all()
    # the correct full-Hessian preconditioner is symmetric: V diag(p) Vᵀ
    p = curvature.build_preconditioner("hessian", 1e-2, 0.5, curv)
    P = p.apply(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(P, P.T, rtol=1e-9, atol=1e-12)
    assert torch.linalg.slogdet(P)[1].item() == pytest.approx(0.0, abs=1e-6)  # unit determinant
    # Adam moments are the optimizer's raw buffers, in parameters() order
    nu = torch.cat([opt["state"][i]["exp_avg_sq"].flatten() for i in range(4)]).double()
    torch.testing.assert_close(curv["adam_nu"], nu)
    with pytest.raises(ValueError, match="unknown preconditioner kind 'fisher'"):
        curvature.build_preconditioner("fisher", 1e-2, 0.5, curv)


def test_figure1_stage_and_plot_stage(tiny, tmp_path):
    out = {k: str(tmp_path / v) for k, v in {
        "estimates_path": "e.json", "metrics_path": "m.json", "samples_path": "s.npz",
        "spectra_path": "sp.npz", "progress_dir": "progress"}.items()}
    summary = estimate.figure1_stage(
        data_dir=str(tiny / "data"), split_path=str(tiny / "split.npz"),
        model_dir=str(tiny / "model"), **out, cutoff=1e-2, sigma=1.4, rtol=1e-2, seed=0,
        n_samples_naive=8, n_samples_preconditioned=4, batch_size=4, exponent=0.5,
        preconditioners={"h": {"kind": "hessian", "eps": 0.01},
                         "nu": {"kind": "adam_nu", "eps": 1e-3}},
        progress=False)
    assert list(summary["estimates"]) == ["naive", "h", "nu"]
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(summary))
    assert set(summary["config"]) >= {"cutoff", "sigma", "rtol", "seed", "n_samples_naive",
                                      "n_samples_preconditioned", "batch_size", "preconditioners",
                                      "n_params", "n_heldout", "n_train", "cost", "model_sha256"}
    assert (summary["config"]["n_params"], summary["config"]["n_heldout"]) == (310, 773)
    for key, r in summary["estimates"].items():
        assert {"kind", "eps", "label"} <= set(r) and "wall_time_s" not in r
    assert summary["estimates"]["nu"]["label"] == "Adam ν, ε=1e-3"
    assert summary["estimates"]["naive"]["kind"] == "naive"
    # the prior term is −|θ0|²/(2σ²), the same for every estimate
    mlp, _ = model.load_trained(tiny / "model")
    theta = torch.nn.utils.parameters_to_vector(mlp.parameters()).double()
    expected = -(theta @ theta).item() / (2 * 1.4**2)
    assert summary["log_prior_at_anchor"] == pytest.approx(expected, rel=1e-9)
    assert summary["anchor_norm"] == pytest.approx(theta.norm().item(), rel=1e-12)
    with np.load(tmp_path / "s.npz") as z:
        s = z["naive__samples"]
        assert s.shape == (8,)
        agg = np.logaddexp.reduce(s) - math.log(8)
        assert summary["estimates"]["naive"]["log_volume"] == pytest.approx(agg)
        assert z["h__radii"].shape == (4,)
    with np.load(tmp_path / "sp.npz") as z:
        assert "hessian_eigenvalues" in z.files and "hessian_eigenvectors" not in z.files
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"naive", "h", "nu"}
    for key, m in metrics.items():
        r = summary["estimates"][key]
        assert m == {f: r[f] for f in estimate.METRICS}
    timings = json.loads((tmp_path / "e.timings.json").read_text())
    assert set(timings["curvature_wall_time_s"]) == {"hessian_s", "eigh_s"}
    assert not (tmp_path / "progress").exists(), "progress files removed when done"

    table = plot.aggregates_table(summary)
    row = table.set_index("key").loc["h"]
    assert row["log10_neighbourhood"] == pytest.approx(
        row["log10_volume"] - row["log10_prior_term"])
    assert row["label"] == "Hessian V diag(p) Vᵀ, ε=1e-2"

    figs = {k: str(tmp_path / v) for k, v in {
        "figure_png": "f.png", "figure_pdf": "f.pdf", "table_csv": "t.csv",
        "table_md": "t.md"}.items()}
    res = plot.plot_stage(estimates_path=out["estimates_path"],
                          samples_path=out["samples_path"], **figs, bins=5, dpi=40,
                          width=6.0, height=3.0)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    md = (tmp_path / "t.md").read_text()
    assert "σ = 1.4000" in md and "Adam ν, ε=1e-3" in md
    # one dashed aggregate line per estimate, at the aggregate
    ax = res["figure"].axes[0]
    xs = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--")
    assert xs == pytest.approx(sorted(table["log10_volume"]))


BAD = dict(data_dir="x", split_path="x", model_dir="x", estimates_path="x", metrics_path="x",
           samples_path="x", spectra_path="x", progress_dir="x", cutoff=1e-2, sigma=1.0,
           rtol=1e-2, seed=0, n_samples_naive=2, n_samples_preconditioned=2, batch_size=2,
           exponent=0.5, preconditioners={})
SEL = {"n_pilot": 4, "pilot_seed": 1, "eps": [1e-3, 1e-1], "exponents": [0.25, 0.5]}


@pytest.mark.parametrize("change, message", [
    ({"preconditioners": {"f": {"kind": "fisher", "eps": 1.0}}}, "kind 'fisher' unknown"),
    ({"preconditioners": {"f": {"kind": "hessian", "ep": 1.0}}}, "exactly the keys kind and eps"),
    ({"preconditioners": {"naive": {"kind": "hessian", "eps": 1}}}, "reserved"),
    ({"preconditioners": {"a__b": {"kind": "hessian", "eps": 1}}}, "reserved or contains '__'"),
    ({"preconditioners": {"f": {"kind": "hessian", "eps": 0.0}}},
     r"estimate_figure1\.preconditioners\.f\.eps"),
    ({"n_samples_naive": 0}, r"estimate_figure1\.n_samples_naive"),
    ({"batch_size": 1.5}, r"estimate_figure1\.batch_size"),
    ({"cutoff": 0.0}, r"estimate_figure1\.cutoff"),
    ({"sigma": -1.0}, r"estimate_figure1\.sigma"),
    ({"selection": {"n_pilot": 4}}, r"estimate_figure1.selection must have exactly the keys"),
    ({"selection": {**SEL, "n_pilot": -1}}, r"selection.n_pilot must be an integer ≥ 0"),
    ({"selection": {**SEL, "pilot_seed": 0}}, r"selection.pilot_seed \(0\) must differ from estimate_figure1.seed"),
    ({"selection": {**SEL, "eps": [-1.0]}}, r"selection.eps must be a number or a non-empty list .* ≥ 0"),
    ({"selection": {**SEL, "eps": [float("inf")]}}, r"selection.eps must be"),
    ({"selection": {**SEL, "eps": [1e-3, 1.0000001e-3]}}, r"selection.eps must be .*distinct"),
    ({"selection": {**SEL, "exponents": [0.0]}}, r"selection.exponents must be .* > 0"),
    ({"selection": {**SEL, "pilot_seed": -1}}, r"selection.pilot_seed must be an integer in \[0, 2\^32\)"),
    ({"selection": SEL, "preconditioners": {"hessian_selected": {"kind": "hessian", "eps": 0.1}}},
     r"\['hessian_selected'\] would collide"),
])
def test_figure1_stage_rejects_bad_settings_before_reading_files(change, message):
    with pytest.raises(ValueError, match=message):
        estimate.figure1_stage(**{**BAD, **change})


def test_figure1_selection_adds_one_estimate_per_kind_at_the_pilots_best_point(tiny, tmp_path):
    """estimate_figure1.selection: pilots on every grid point (seed pilot_seed), the largest
    pilot aggregate chosen, then k fresh directions of the stage's seed; the other estimates are
    exactly those of a run without selection."""
    out = {k: str(tmp_path / v) for k, v in {
        "estimates_path": "e.json", "metrics_path": "m.json", "samples_path": "s.npz",
        "spectra_path": "sp.npz", "progress_dir": "progress"}.items()}
    kw = dict(data_dir=str(tiny / "data"), split_path=str(tiny / "split.npz"),
              model_dir=str(tiny / "model"), **out, cutoff=1e-2, sigma=1.4, rtol=1e-2, seed=0,
              n_samples_naive=8, n_samples_preconditioned=6, batch_size=4, exponent=0.5,
              preconditioners={"h1": {"kind": "hessian", "eps": 0.01},
                               "h2": {"kind": "hessian", "eps": 0.1},
                               "nu": {"kind": "adam_nu", "eps": 1e-3}}, progress=False)
    plain = estimate.figure1_stage(**kw)
    with np.load(tmp_path / "s.npz") as z:
        plain_arrays = {k: z[k] for k in z.files}
    summary = estimate.figure1_stage(**kw, selection=SEL)
    with np.load(tmp_path / "s.npz") as z:
        arrays = {k: z[k] for k in z.files}
    assert list(summary["estimates"]) == ["naive", "h1", "h2", "nu", "hessian_selected",
                                          "adam_nu_selected"]
    for key in ("naive", "h1", "h2", "nu"):
        np.testing.assert_array_equal(arrays[f"{key}__samples"], plain_arrays[f"{key}__samples"])
    for kind in ("hessian", "adam_nu"):
        report = summary["pilots"][kind]
        assert len(report["candidates"]) == 4 and sum(c["chosen"] for c in report["candidates"]) == 1
        best = max(report["candidates"], key=lambda c: c["pilot_log10_volume"])
        rec = summary["estimates"][f"{kind}_selected"]
        assert (rec["eps"], rec["exponent"]) == (best["eps"], best["exponent"])
        assert rec["n_samples"] == 6
        pilot = arrays[f"pilot/{kind}/eps={best['eps']:g},exponent={best['exponent']:g}__samples"]
        assert pilot.shape == (4,) and pilot[0] != arrays[f"{kind}_selected__samples"][0]
        if (best["eps"], best["exponent"]) == (1e-3, 0.5) and kind == "adam_nu":
            # the same preconditioner as "nu" on the same seed: the same samples
            np.testing.assert_array_equal(arrays["adam_nu_selected__samples"],
                                          arrays["nu__samples"])


@pytest.mark.slow
def test_figure1_stage_on_two_and_three_processes_writes_the_same_results(tiny, tmp_path, monkeypatch):
    """replication.scale.run_stage: torchrun ranks (CPU, gloo) compute the (unit, block) pairs,
    the stage merges their shards; the records and per-sample arrays do not depend on the
    number of ranks."""
    from localvol import VolumeRun
    from replication.scale import run_stage

    searched = []  # directions this process searches: none when the ranks did it all
    search = VolumeRun._search
    monkeypatch.setattr(VolumeRun, "_search", lambda self, idx, guide: (
        searched.extend(idx.tolist()), search(self, idx, guide))[1])
    outputs = {}
    for processes in (1, 2, 3):
        searched.clear()
        root = tmp_path / f"p{processes}"
        out = {k: str(root / v) for k, v in {
            "estimates_path": "e.json", "metrics_path": "m.json", "samples_path": "s.npz",
            "spectra_path": "sp.npz", "progress_dir": "progress"}.items()}
        params = dict(
            data_dir=str(tiny / "data"), split_path=str(tiny / "split.npz"),
            model_dir=str(tiny / "model"), **out, cutoff=1e-2, sigma=1.4, rtol=1e-2, seed=0,
            n_samples_naive=300, n_samples_preconditioned=5, batch_size=16, exponent=0.5,
            preconditioners={"nu": {"kind": "adam_nu", "eps": 1e-3},
                             "h": {"kind": "hessian", "eps": 1e-2}},  # eigh in every rank
            progress=False, processes=processes)
        run_stage(estimate.figure1_stage, params)
        assert len(searched) == (310 if processes == 1 else 0), processes  # ranks searched the rest
        with np.load(root / "s.npz") as z:
            arrays = {k: z[k] for k in z.files}
        outputs[processes] = (json.loads((root / "e.json").read_text()), arrays)
        assert not (root / "progress").exists()
    # ranks of one thread each (torchrun's default): 2 and 3 ranks agree bit for bit
    records, arrays = outputs[2]
    assert arrays["naive__samples"].shape == (300,)  # two blocks of the naive unit
    assert outputs[3][0] == records
    assert outputs[3][1].keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(outputs[3][1][key], value, err_msg=key)
    # one process uses this process's threads: the cost's float32 sums may round differently
    # with another thread count, so the comparison with it allows float rounding
    for key, value in arrays.items():
        np.testing.assert_allclose(outputs[1][1][key], value, rtol=1e-6, err_msg=key)


def test_run_stage_rejects_a_bad_process_count():
    from replication.scale import run_stage

    with pytest.raises(ValueError, match=r"scale.processes must be an integer ≥ 1 .*got 0"):
        run_stage(estimate.figure1_stage, {"processes": 0})
