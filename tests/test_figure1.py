"""Figure 1 orchestration (localvol.figure1) and its plot (localvol.plots), on a tiny MLP."""

import json
import math

import numpy as np
import pytest
import torch

import localvol
from localvol import digits, figure1, plots


def test_labels_and_kinds():
    assert figure1.preconditioner_label("naive", None) == "naive"
    assert figure1.preconditioner_label("adam_nu", 1e-3) == "Adam ν, ε=1e-3"
    assert figure1.preconditioner_label("hessian", 0.1) == "Hessian V diag(p) Vᵀ, ε=1e-1"
    assert figure1.preconditioner_label("hesscale", 0.05) == "HesScale, ε=0.05"
    assert figure1.needed_curvature({"hessian", "adam_mu"}) == {
        "hessian_eigh", "hessian_diagonal", "adam_mu"}
    assert figure1.needed_curvature({"diag_hessian"}) == {"hessian_diagonal"}
    assert figure1.needed_curvature(set()) == set()
    with pytest.raises(ValueError, match="unknown preconditioner kind"):
        figure1.needed_curvature({"fisher"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained 64 → 4 → 10 MLP (330 parameters) with its split, on disk."""
    root = tmp_path_factory.mktemp("fig1")
    data = root / "data"
    digits.write_raw_data(data)
    split = root / "split.npz"
    digits.split_stage(data_dir=str(data), split_path=str(split), seed=0, n_train=1024)
    digits.train_stage(data_dir=str(data), split_path=str(split), model_dir=str(root / "model"),
                       metrics_path=str(root / "tm.json"), history_path=str(root / "h.csv"),
                       seed=0, hidden=4, lr=0.05, epochs=2, batch_size=64, l2=5e-4,
                       betas=[0.9, 0.999], adam_eps=1e-8)
    return root


def test_curvature_and_preconditioners(tiny):
    images, labels = digits.load_digits(tiny / "data")
    train, held = digits.load_split(tiny / "split.npz")
    model, opt = digits.load_trained(tiny / "model")
    n = digits.count_parameters(model)
    need = figure1.needed_curvature(set(figure1.KINDS))
    curv, times = figure1.compute_curvature(
        need, model, torch.as_tensor(images[held]), torch.as_tensor(images[train]),
        torch.as_tensor(labels[train]), opt)
    assert set(curv) == {"hessian_eigenvalues", "hessian_eigenvectors", "hessian_diagonal",
                         "hesscale", "adam_mu", "adam_nu"}
    assert set(times) == {"hessian_s", "eigh_s", "hesscale_s"}
    V, lam = curv["hessian_eigenvectors"], curv["hessian_eigenvalues"]
    assert V.shape == (n, n) and V.dtype == torch.float64
    # one decomposition of the (symmetric, PSD Fisher) Hessian, consistent with its diagonal
    H = (V * lam) @ V.T
    torch.testing.assert_close(H.diagonal(), curv["hessian_diagonal"], rtol=1e-6, atol=1e-10)
    assert lam.min() > -1e-8 * lam.max()
    u = torch.randn(3, n, dtype=torch.float64)
    for kind in figure1.KINDS:
        p = figure1.build_preconditioner(kind, 1e-2, 0.5, curv)
        v = p.apply(u)
        assert v.shape == u.shape and torch.isfinite(v).all()
    # the correct full-Hessian preconditioner is symmetric: V diag(p) Vᵀ
    p = figure1.build_preconditioner("hessian", 1e-2, 0.5, curv)
    P = p.apply(torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(P, P.T, rtol=1e-9, atol=1e-12)
    assert torch.linalg.slogdet(P)[1].item() == pytest.approx(0.0, abs=1e-6)  # unit determinant
    # Adam moments are the optimizer's raw buffers, in parameters() order
    nu = torch.cat([opt["state"][i]["exp_avg_sq"].flatten() for i in range(4)]).double()
    torch.testing.assert_close(curv["adam_nu"], nu)


def test_estimate_stage_and_plot_stage(tiny, tmp_path):
    out = {k: str(tmp_path / v) for k, v in {
        "estimates_path": "e.json", "metrics_path": "m.json", "samples_path": "s.npz",
        "spectra_path": "sp.npz", "checkpoint_dir": "ckpt"}.items()}
    summary = figure1.estimate_stage(
        data_dir=str(tiny / "data"), split_path=str(tiny / "split.npz"),
        model_dir=str(tiny / "model"), **out, cutoff=1e-2, sigma=1.4, rtol=1e-2, seed=0,
        n_samples_naive=8, n_samples_preconditioned=4, batch_size=4, exponent=0.5,
        preconditioners={"h": {"kind": "hessian", "eps": 0.01},
                         "nu": {"kind": "adam_nu", "eps": 1e-3}},
        progress=False)
    assert list(summary["estimates"]) == ["naive", "h", "nu"]
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(summary))
    # the prior term is −|θ0|²/(2σ²), the same for every estimate
    model, _ = digits.load_trained(tiny / "model")
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).double()
    expected = -(theta @ theta).item() / (2 * 1.4**2)
    assert summary["log_prior_at_anchor"] == pytest.approx(expected, rel=1e-9)
    with np.load(tmp_path / "s.npz") as z:
        s = z["naive__samples"]
        assert s.shape == (8,)
        agg = np.logaddexp.reduce(s) - math.log(8)
        assert summary["estimates"]["naive"]["log_volume"] == pytest.approx(agg)
        assert z["h__radii"].shape == (4,)
    with np.load(tmp_path / "sp.npz") as z:
        assert "hessian_eigenvalues" in z.files and "hessian_eigenvectors" not in z.files
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"log10_prior_at_anchor", "naive", "h", "nu"}
    assert not list((tmp_path / "ckpt").glob("*.npz")), "checkpoints removed when done"

    table = figure1.aggregates_table(summary)
    row = table.set_index("name").loc["h"]
    assert row["log10_neighbourhood"] == pytest.approx(
        row["log10_volume"] - row["log10_prior_term"])

    figs = {k: str(tmp_path / v) for k, v in {
        "figure_png": "f.png", "figure_pdf": "f.pdf", "table_csv": "t.csv",
        "table_md": "t.md"}.items()}
    res = plots.plot_stage(estimates_path=out["estimates_path"],
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


def test_estimate_stage_rejects_bad_preconditioner_specs(tiny, tmp_path):
    kwargs = dict(data_dir="x", split_path="x", model_dir="x", estimates_path="x",
                  metrics_path="x", samples_path="x", spectra_path="x", checkpoint_dir="x",
                  cutoff=1e-2, sigma=1.0, rtol=1e-2, seed=0, n_samples_naive=2,
                  n_samples_preconditioned=2, batch_size=2, exponent=0.5)
    with pytest.raises(ValueError, match="kind 'fisher' unknown"):
        figure1.estimate_stage(**kwargs, preconditioners={"f": {"kind": "fisher", "eps": 1.0}})
    with pytest.raises(ValueError, match="exactly the keys kind and eps"):
        figure1.estimate_stage(**kwargs, preconditioners={"f": {"kind": "hessian", "ep": 1.0}})
    with pytest.raises(ValueError, match="reserved"):
        figure1.estimate_stage(**kwargs, preconditioners={"naive": {"kind": "hessian", "eps": 1}})


def test_training_curves_figure():
    history = [{"epoch": e, "train_loss": 1 / e, "heldout_loss": 1.2 / e,
                "train_accuracy": 0.9, "heldout_accuracy": 0.8} for e in (1, 2, 3)]
    fig = plots.training_curves(history)
    assert len(fig.axes) == 2
