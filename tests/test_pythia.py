"""Pythia pieces (localvol.pythia), offline and on CPU: step-list checks, the Pythia-31M shape,
real-token counting, the hub loader on saved step{N} folders, the raw DeepSpeed flat-group
mapping, the squared-gradient EMA against a hand computation, and the three stage notebooks
through papermill on tiny settings."""

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

import localvol
from localvol import pythia
from localvol.stages import run_notebook

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "pythia-tokenizer" / "20B_tokenizer.json"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.exists(), reason=f"{TOKENIZER} missing")


def tiny_model(vocab=64, seed=0):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = pythia.model_config(hidden=8, layers=2, heads=2, intermediate=16, max_positions=32,
                              vocab_size=vocab)
    return GPTNeoXForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("steps, match", [
    ([0], "at least two"), ([1, 2], "must be 0"), ([0, 4, 2], "increasing"),
    ([0, 0, 1], "increasing"), ([0, -1], "non-negative"), ([0, 1.5], "integers"),
    ([0, True], "integers"),
])
def test_check_steps_rejects_bad_lists(steps, match):
    with pytest.raises(ValueError, match=match):
        pythia.check_steps(steps)


def test_check_steps_accepts_the_papers_34_steps():
    assert len(pythia.check_steps(pythia.PAPER_STEPS)) == 34


def test_pythia_31m_shape_has_the_papers_parameter_count():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**pythia.PYTHIA_31M_CONFIG))
    assert sum(p.numel() for p in model.parameters()) == pythia.PYTHIA_31M_N_PARAMS == 30_494_720


@needs_tokenizer
def test_eval_tokens_counted_without_padding_and_kl_averages_real_tokens_only():
    tok = pythia.load_tokenizer(TOKENIZER)
    assert tok("Hello world")["input_ids"] == [12092, 1533]
    texts = ["Hello world, this is a longer document with more tokens in it.", "Short one.",
             "x " * 100]
    ev = pythia.tokenize_eval(tok, texts, max_tokens=20)
    lengths = [min(len(tok(t)["input_ids"]), 20) for t in texts]
    assert ev["input_ids"].shape == (3, 20)
    assert ev["n_real_tokens"] == sum(lengths) == int(ev["attention_mask"].sum())
    assert ev["n_padding_tokens"] == 60 - sum(lengths) > 0
    assert ev["attention_mask"][1, : lengths[1]].all() and not ev["attention_mask"][1, lengths[1]:].any()

    # the KL of a perturbed model is the token-weighted mean over the real tokens of each document
    model = tiny_model(vocab=50304)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    theta = theta + 0.05 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1))
    padded = localvol.ExpectedKL(model, ev["input_ids"], batch_size=2,
                                 attention_mask=ev["attention_mask"])(theta[None])
    per_doc = []
    for i, n in enumerate(lengths):
        ids = ev["input_ids"][i : i + 1, :n]
        per_doc.append(float(localvol.ExpectedKL(model, ids)(theta[None])) * n)
    assert float(padded) == pytest.approx(sum(per_doc) / sum(lengths), rel=1e-4)


def test_hub_loader_reads_step_folders_offline(tmp_path):
    repo = tmp_path / "hub"
    models = {s: tiny_model(seed=s) for s in (0, 3)}
    for s, m in models.items():
        m.save_pretrained(repo / f"step{s}")
    manifest = pythia.fetch_hub(tmp_path / "out", repo_id=str(repo), steps=[0, 3],
                                local_files_only=True, progress=False)
    assert manifest["steps"] == [0, 3] and manifest["source"] == "hub"
    for s, m in models.items():
        loaded, state = pythia.load_checkpoint(tmp_path / "out", s)
        assert state is None
        assert (tmp_path / "out" / f"step{s}" / "model.safetensors").exists()
        for (n, a), (_, b) in zip(m.named_parameters(), loaded.named_parameters()):
            assert torch.equal(a, b), n
    with pytest.raises(OSError):
        pythia.fetch_hub(tmp_path / "out2", repo_id=str(repo), steps=[0, 5], progress=False)


def _deepspeed_checkpoint(model, path, pad=3):
    """A synthetic GPT-NeoX/DeepSpeed model_states file: two flat fp32 groups (decay:
    matrices, no decay: vectors) in model order, zero alignment padding, distinct moments."""
    groups = [[p for p in model.parameters() if p.ndim >= 2],
              [p for p in model.parameters() if p.ndim < 2]]
    gen = torch.Generator().manual_seed(0)
    flats, moments, expected = [], [], {}
    for g in groups:
        flat = torch.cat([p.detach().reshape(-1) for p in g] + [torch.zeros(pad)])
        mom = torch.rand(flat.shape, generator=gen) + 0.1
        off = 0
        for p in g:
            expected[id(p)] = mom[off : off + p.numel()]
            off += p.numel()
        flats.append(flat)
        moments.append(mom)
    torch.save({"optimizer": {
        "fp32_groups_flat": flats,
        "optimizer_state_dict": {"state": {i: {"exp_avg": torch.zeros_like(m), "exp_avg_sq": m}
                                           for i, m in enumerate(moments)}},
    }}, path)
    return torch.cat([expected[id(p)] for p in model.parameters()])


def test_raw_deepspeed_groups_map_back_to_parameters_with_identical_values(tmp_path):
    model = tiny_model()
    named = dict(model.named_parameters())
    # at initialisation all LayerNorm gains are ones: identical-valued parameters
    assert torch.equal(named["gpt_neox.layers.0.input_layernorm.weight"],
                       named["gpt_neox.layers.1.input_layernorm.weight"])
    expected = _deepspeed_checkpoint(model, tmp_path / "mp_rank_00_model_states.pt")
    flat, mom = pythia.read_deepspeed_moments(tmp_path / "mp_rank_00_model_states.pt")
    nu, info = pythia.map_flat_groups(model, flat, mom)
    assert torch.equal(nu, expected)
    assert info["relative_reconstruction_error"] < 1e-6
    assert nu.numel() == sum(p.numel() for p in model.parameters())
    # another model's weights do not map
    with pytest.raises(ValueError, match="not found|differ"):
        pythia.map_flat_groups(tiny_model(seed=1), flat, mom)


def test_squared_gradient_ema_matches_a_hand_computation():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(3)]
    beta2 = 0.9
    nu = pythia.squared_gradient_moment(model, batches, beta2=beta2)
    by_hand = 0.0
    for x in batches:
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        by_hand = beta2 * by_hand + (1 - beta2) * g**2
    by_hand = by_hand / (1 - beta2**3)
    torch.testing.assert_close(nu, by_hand, rtol=1e-5, atol=1e-12)
    # clipping scales each batch's gradient to the clip norm, as clip_grad_norm_ before Adam
    clipped = pythia.squared_gradient_moment(model, batches[:1], beta2=beta2, grad_clip=1e-3)
    assert float(clipped.sum().sqrt()) == pytest.approx(1e-3, rel=1e-3)


TINY_FETCH = {"steps": [0, 2], "hidden": 8, "layers": 1, "heads": 2, "intermediate": 16,
              "seq_len": 16, "batch_size": 2, "warmup": 2, "n_heldout": 2,
              "tokenizer_path": str(TOKENIZER)}
TINY_ESTIMATE = {"max_eval_tokens": 16, "k_checkpoints": 2, "k_histogram": 3,
                 "cutoffs": [1e-2, 1.0], "k_cutoffs": 2, "sqgrad_batches": 2,
                 "sqgrad_batch_size": 2, "sqgrad_seq_len": 16}


@needs_tokenizer
@pytest.mark.slow
def test_pythia_stage_notebooks_run_in_order_with_tiny_parameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for stage, params in (("fetch_pythia", TINY_FETCH), ("estimate_pythia", TINY_ESTIMATE),
                          ("plot_pythia", {"bins": 4, "dpi": 40})):
        run_notebook(REPO / "notebooks" / f"{stage}.ipynb", tmp_path / "executed" / f"{stage}.ipynb",
                     params, stream=False)
    ck = Path("results/pythia/checkpoints")
    for s in (0, 2):
        assert (ck / f"step{s}" / "model.safetensors").exists()
        assert (ck / f"step{s}" / "optimizer.pt").exists()
    summary = json.loads(Path("results/pythia/estimates.json").read_text())
    c = summary["config"]
    assert c["n_params"] == sum(p.numel() for p in pythia.load_checkpoint(ck, 0)[0].parameters())
    model0, _ = pythia.load_checkpoint(ck, 0)
    theta0 = torch.nn.utils.parameters_to_vector(model0.parameters()).double()
    assert c["sigma"] == pytest.approx(float(theta0.detach().pow(2).mean().sqrt()))
    t = summary["eval_tokens"]
    assert t["n_real_tokens"] + t["n_padding_tokens"] == t["shape"][0] * t["shape"][1]
    est = summary["estimates"]
    # step 0: prior term is exactly −N/2 nats (σ is its RMS); Adam ν = 0 there, so Adam = naive
    assert est["ckpt_naive_step0"]["log_prior_at_anchor"] == pytest.approx(-c["n_params"] / 2)
    assert est["ckpt_adam_step0"]["log_volume"] == pytest.approx(est["ckpt_naive_step0"]["log_volume"])
    # ... and every result says whether its preconditioner was the identity
    assert est["ckpt_adam_step0"]["preconditioner_is_identity"] is True
    assert est["ckpt_adam_step2"]["preconditioner_is_identity"] is False
    manifest = pythia.read_manifest(ck)
    assert set(manifest["parameter_sha256"]) == {"0", "2"}
    assert not Path("results/checkpoints/estimate_pythia").exists()  # no resume state left behind
    assert "kl_evaluation_s" in json.loads(Path("results/pythia/estimates.timings.json").read_text())
    for key, r in est.items():
        assert np.isfinite(r["log10_volume"]), key
        assert r["log10_volume"] == pytest.approx(r["log10_prior_at_anchor"] + r["log10_neighbourhood"])
    assert {"hist_naive", "hist_adam", "hist_sqgrad", "cutoff_naive_1", "cutoff_adam1_1"} <= set(est)
    assert -1 <= summary["squared_gradient_comparison"]["log_nu_correlation"] <= 1
    for fig in ("figure2", "figure4", "figure6"):
        for suffix in ("png", "pdf"):
            assert Path(f"figures/{fig}_pythia.{suffix}").stat().st_size > 1000
    assert "real tokens" in Path("figures/pythia_aggregates.md").read_text()
    executed = nbformat.read(tmp_path / "executed" / "fetch_pythia.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
