"""The five Pythia stage notebooks (fetch_pythia, estimate_figure4/2/6, plot_pythia) through
papermill on tiny settings, in order, with the checks of their numbers: σ is the RMS of step 0,
the prior term at step 0 is exactly −N/2 nats, Adam = naive at step 0 (ν = 0), every aggregate
is its prior plus neighbourhood terms, and no resume state is left behind."""
import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from replication.pipeline import run_notebook, stage_paths
from replication.pythia import checkpoints

REPO = Path(__file__).resolve().parents[3]
TOKENIZER = REPO.parent / "shared" / "data" / "pythia-tokenizer" / "20B_tokenizer.json"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} missing")

SHARED = {"max_eval_tokens": 16, "sqgrad_batches": 2, "sqgrad_batch_size": 2, "sqgrad_seq_len": 16}
TINY = {
    "fetch_pythia": {"steps": [0, 2], "hidden": 8, "layers": 1, "heads": 2, "intermediate": 16,
                     "seq_len": 16, "batch_size": 2, "warmup": 2, "n_heldout": 2,
                     "tokenizer_path": str(TOKENIZER)},
    "estimate_figure4": {**SHARED, "k": 2},
    "estimate_figure2": {**SHARED, "k": 3},
    "estimate_figure6": {**SHARED, "cutoffs": [1e-2, 1.0], "k": 2},
    "plot_pythia": {"bins": 4, "dpi": 40},
}


def _read(path):
    return json.loads(Path(path).read_text())


@needs_tokenizer
@pytest.mark.slow
def test_pythia_stage_notebooks_run_in_order_with_tiny_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")  # the repository root marker
    for stage, params in TINY.items():
        run_notebook(REPO / "notebooks" / f"{stage}.py", tmp_path / "executed" / f"{stage}.ipynb",
                     {**stage_paths(stage, REPO / "dvc.yaml"), **params}, stream=False)
    ck = Path("results/pythia/checkpoints")
    for s in (0, 2):
        assert (ck / f"step{s}" / "model.safetensors").exists()
        assert (ck / f"step{s}" / "optimizer.pt").exists()
    assert set(checkpoints.read_manifest(ck)["parameter_sha256"]) == {"0", "2"}
    # the training curve for `dvc plots`: one row per saved step, the manifest's losses
    curve = np.genfromtxt("results/pythia/train_history.csv", delimiter=",", names=True)
    history = checkpoints.read_manifest(ck)["history"]
    assert list(curve["step"]) == [0, 2] and curve.dtype.names == ("step", "train_loss", "heldout_loss")
    np.testing.assert_allclose(curve["heldout_loss"], [h["heldout_loss"] for h in history], rtol=1e-7)
    model0, _ = checkpoints.load_checkpoint(ck, 0)
    n_params = sum(p.numel() for p in model0.parameters())
    theta0 = torch.nn.utils.parameters_to_vector(model0.parameters()).double()
    summaries = {f: _read(f"results/pythia/figure{f}/estimates.json") for f in (2, 4, 6)}
    for f, summary in summaries.items():
        c, t = summary["config"], summary["eval_tokens"]
        assert c["n_params"] == n_params and c["steps"] == [0, 2] and c["source"] == "local"
        assert c["sigma"] == pytest.approx(float(theta0.detach().pow(2).mean().sqrt()))
        assert t["n_real_tokens"] + t["n_padding_tokens"] == t["shape"][0] * t["shape"][1]
        assert not Path(f"results/progress/estimate_figure{f}").exists()  # no resume state left
        assert "kl_evaluation_s" in _read(f"results/pythia/figure{f}/estimates.timings.json")
        for key, r in summary["estimates"].items():
            assert np.isfinite(r["log10_volume"]), key
            assert r["log10_volume"] == pytest.approx(r["log10_prior_at_anchor"] + r["log10_neighbourhood"])
            assert r["figure"] == f
        metrics = _read(f"results/pythia/figure{f}/estimate_metrics.json")
        assert set(summary["estimates"]) <= set(metrics)
        with np.load(f"results/pythia/figure{f}/samples.npz") as z:
            assert {f"{k}__samples" for k in summary["estimates"]} <= set(z.files)

    est = summaries[4]["estimates"]
    assert set(est) == {"ckpt_naive_step0", "ckpt_adam_step0", "ckpt_naive_step2", "ckpt_adam_step2"}
    # step 0: prior term is exactly −N/2 nats (σ is its RMS); Adam ν = 0 there, so Adam = naive
    assert est["ckpt_naive_step0"]["log_prior_at_anchor"] == pytest.approx(-n_params / 2)
    assert est["ckpt_adam_step0"]["log_volume"] == pytest.approx(est["ckpt_naive_step0"]["log_volume"])
    # ... and every result says whether its preconditioner was the identity
    assert est["ckpt_adam_step0"]["preconditioner_is_identity"] is True
    assert est["ckpt_adam_step2"]["preconditioner_is_identity"] is False
    assert [h["step"] for h in summaries[4]["training_history"]] == [0, 2]

    assert set(summaries[2]["estimates"]) == {"hist_naive", "hist_adam", "hist_sqgrad"}
    comparison = summaries[2]["squared_gradient_comparison"]
    assert -1 <= comparison["log_nu_correlation"] <= 1
    assert comparison["difference_log10"] == pytest.approx(
        summaries[2]["estimates"]["hist_sqgrad"]["log10_volume"]
        - summaries[2]["estimates"]["hist_adam"]["log10_volume"])
    assert set(_read("results/pythia/figure2/estimate_metrics.json")["squared_gradients"]) == {
        "difference_log10", "log_nu_correlation", "log_scale_correlation"}
    assert set(summaries[6]["estimates"]) == {f"cutoff_{s}_{i}" for s in ("naive", "adam0", "adam1")
                                               for i in (0, 1)}

    for fig in ("figure2", "figure4", "figure6"):
        for suffix in ("png", "pdf"):
            assert Path(f"figures/{fig}_pythia.{suffix}").stat().st_size > 1000
    markdown = Path("figures/pythia_aggregates.md").read_text()
    assert "real tokens" in markdown and "Squared-gradient ν vs the true Adam ν" in markdown
    assert len(Path("figures/pythia_aggregates.csv").read_text().splitlines()) == 1 + 4 + 3 + 6
    executed = nbformat.read(tmp_path / "executed" / "fetch_pythia.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
