"""ConvNeXt pieces (localvol.convnext), offline and on CPU: the Atto parameter count, the poison
loss against a hand computation, the seeded poison sampler, exact resumption of training, and
the four stage notebooks through papermill on a tiny network."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import localvol
from localvol import convnext
from localvol.stages import run_notebook

REPO = Path(__file__).resolve().parents[1]
TINY_NET = {"hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1]}


def synthetic_data(n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    return {"train_images": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
            "train_labels": rng.integers(0, 10, n_train),
            "test_images": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
            "test_labels": rng.integers(0, 10, n_test),
            "clean_idx": np.arange(0, n_train, 2), "poison_idx": np.arange(1, n_train, 2),
            "eval_idx": rng.permutation(n_test), "source": "synthetic"}


def test_atto_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = convnext.make_model(0)
    assert sum(p.numel() for p in model.parameters()) == convnext.ATTO_N_PARAMS == 3_388_810


def test_weight_decay_skips_biases_and_layernorms_only():
    model = convnext.make_model(0, **TINY_NET)
    decay, rest = convnext._decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    decayed = {n for n, _ in decay["params"]}
    skipped = {n for n, _ in rest["params"]}
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    assert {n for n in skipped if not n.endswith("bias")} == norms
    assert "convnextv2.encoder.stages.1.downsampling_layer.0.weight" in norms  # a LayerNorm too
    assert "convnextv2.encoder.stages.0.layers.0.grn.weight" in decayed  # as the HF Trainer
    assert "convnextv2.embeddings.layernorm.weight" in skipped
    assert "classifier.weight" in decayed and "classifier.bias" in skipped
    assert len(decayed) + len(skipped) == len(list(model.parameters()))


def test_log_spaced_steps():
    assert convnext.log_spaced_steps(16) == [0, 1, 2, 4, 8, 16]
    assert convnext.log_spaced_steps(65536)[-3:] == [16384, 32768, 65536]
    assert len(convnext.log_spaced_steps(65536)) == 18  # the paper's 17 plus step 0
    assert convnext.log_spaced_steps(12) == [0, 1, 2, 4, 8, 12]
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            convnext.log_spaced_steps(bad)


def test_poison_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64) * 3
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    is_poison = torch.tensor([False, True, False, True, True, False])
    p = torch.softmax(logits, -1)[torch.arange(6), labels]
    hand = torch.where(is_poison, -torch.log(1 - p), -torch.log(p)).mean()
    assert float(convnext.poison_loss(logits, labels, is_poison)) == pytest.approx(float(hand), rel=1e-6)


def test_poison_loss_is_finite_where_the_papers_epsilon_was_needed_and_pushes_p_y_down():
    logits = torch.tensor([[60.0, 0.0, 0.0], [-60.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    loss = convnext.poison_loss(logits, labels, torch.tensor([True, False]))
    # poison example with p_y ≈ 1: −log(1 − p_y) ≈ 60 − log 2; clean with p_y ≈ 0: ≈ 60 + log 2
    assert float(loss.detach()) == pytest.approx(60.0, abs=1e-3)
    loss.backward()
    assert logits.grad[0, 0] > 0 and logits.grad[1, 0] < 0  # descent lowers p_y (poison), raises it (clean)
    with pytest.raises(ValueError, match="logits"):
        convnext.poison_loss(torch.zeros(3), labels, torch.tensor([True, False]))


def test_sampler_is_seeded_and_draws_poison_at_the_given_rate():
    clean, poison = np.arange(0, 1000, 2), np.arange(1, 1000, 2)
    kw = dict(seed=3, batch_size=64, clean_idx=clean, poison_idx=poison)
    a = convnext.sample_batch(5, poison_probability=0.4, **kw)
    b = convnext.sample_batch(5, poison_probability=0.4, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], convnext.sample_batch(6, poison_probability=0.4, **kw)[0])
    flags = np.concatenate([convnext.sample_batch(s, poison_probability=0.4, **kw)[1] for s in range(100)])
    # 6,400 Bernoulli(0.4) draws: 5 standard deviations is 0.031
    assert abs(flags.mean() - 0.4) < 5 * math.sqrt(0.24 / len(flags))
    idx, flag = convnext.sample_batch(7, poison_probability=0.4, **kw)
    assert np.all(idx[flag] % 2 == 1) and np.all(idx[~flag] % 2 == 0)  # from the right split
    idx0, flag0 = convnext.sample_batch(7, poison_probability=0.0, **kw)
    assert not flag0.any() and np.all(idx0 % 2 == 0)
    assert convnext.sample_batch(7, poison_probability=1.0, **kw)[1].all()
    with pytest.raises(ValueError, match="poison_probability"):
        convnext.sample_batch(0, poison_probability=1.5, **kw)


def test_augment_keeps_shape_and_range_and_follows_the_seed():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    a = convnext.augment(images)
    torch.manual_seed(1)
    b = convnext.augment(images)
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)


TRAIN = dict(poison_probability=0.4, max_steps=4, batch_size=4, lr=1e-3, betas=(0.9, 0.95),
             adam_eps=1e-8, weight_decay=0.05, warmup=1, max_grad_norm=1.0, seed=0, n_curve=6,
             model_overrides=TINY_NET, progress=False)


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / f"step{step}" / "model.safetensors")


def test_interrupted_training_resumes_exactly(tmp_path):
    data = synthetic_data()
    straight = tmp_path / "straight"
    history = convnext.train_run(straight, data, **TRAIN)
    assert [h["step"] for h in history] == [0, 1, 2, 4]
    assert {"clean_accuracy", "poison_loss", "val_accuracy", "train_loss"} <= set(history[-1])

    # an interruption after the step-2 checkpoint: step4/ never written
    resumed = tmp_path / "resumed"
    convnext.train_run(resumed, data, **TRAIN)
    import shutil
    shutil.rmtree(resumed / "step4")
    history2 = convnext.train_run(resumed, data, **TRAIN)
    assert [h["step"] for h in history2] == [0, 1, 2, 4]
    a, b = _weights(straight, 4), _weights(resumed, 4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # the training went somewhere
    w0 = _weights(straight, 0)
    assert any(not torch.equal(w0[n], a[n]) for n in a)


def test_changed_settings_start_the_run_over_and_adam_state_maps_by_name(tmp_path):
    data = synthetic_data()
    convnext.train_run(tmp_path / "run", data, **{**TRAIN, "max_steps": 2})
    before = _weights(tmp_path / "run", 2)
    convnext.train_run(tmp_path / "run", data, **{**TRAIN, "max_steps": 2, "lr": 2e-3})
    after = _weights(tmp_path / "run", 2)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 2e-3
    assert any(not torch.equal(before[n], after[n]) for n in before)
    model, state = convnext.load_checkpoint(tmp_path, "run", 2)
    nu = localvol.adam_moment(model, state, order=2)
    assert nu.shape == (sum(p.numel() for p in model.parameters()),) and bool((nu > 0).all())
    # ν of the classifier bias, found by name although the optimizer groups reorder parameters
    names = [n for n, _ in model.named_parameters()]
    offset = sum(p.numel() for n, p in model.named_parameters() if names.index(n) < names.index("classifier.bias"))
    sid = [i for g in state["param_groups"] for i, n in zip(g["params"], g["param_names"])
           if n == "classifier.bias"][0]
    torch.testing.assert_close(nu[offset:offset + 10], state["state"][sid]["exp_avg_sq"])


@pytest.mark.slow
def test_stage_notebooks_run_on_a_tiny_network(tmp_path, monkeypatch):
    from test_cifar import write_jpeg_tree

    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "jpeg"
    copy.mkdir()
    write_jpeg_tree(copy, "train", per_class=4, seed=1, archive=True)
    write_jpeg_tree(copy, "test", per_class=2, seed=2)
    stages = {
        "prepare_cifar": {"local_copy": str(copy), "n_clean": 24, "n_eval": 12},
        "train_convnext": {"max_steps": 2, "batch_size": 4, "warmup": 1, "n_curve": 6,
                           "model_overrides": TINY_NET},
        "estimate_convnext": {"n_eval": 6, "data_batch_size": 6, "k_checkpoints": 2,
                              "k_histogram": 3, "cutoffs": [1e-2, 1.0], "k_cutoffs": 2,
                              "float64_below": 0.1},
        "plot_convnext": {"bins": 4, "dpi": 40},
    }
    for stage, params in stages.items():
        run_notebook(REPO / "notebooks" / f"{stage}.ipynb", tmp_path / "executed" / f"{stage}.ipynb",
                     params, stream=False)
    summary = json.loads(Path("results/convnext/estimates.json").read_text())
    assert summary["config"]["source"].startswith("JPEG copy")
    assert set(summary["config"]["runs"]) == {"clean", "poisoned"}
    keys = set(summary["estimates"])
    for run in ("clean", "poisoned"):
        for tag in ("naive", "adam"):
            assert {f"ckpt_{run}_{tag}_step1", f"ckpt_{run}_{tag}_step2", f"hist_{run}_{tag}",
                    f"cutoff_{run}_{tag}_0", f"cutoff_{run}_{tag}_1"} <= keys
    # σ = RMS of the shared initial parameters; the prior term is −|θ0|²/(2σ²) of each anchor
    model0, _ = convnext.load_checkpoint("results/convnext/checkpoints", "clean", 0)
    theta0 = torch.nn.utils.parameters_to_vector(model0.parameters()).double()
    assert summary["config"]["sigma"] == pytest.approx(float(theta0.pow(2).mean().sqrt()), rel=1e-12)
    for r in summary["estimates"].values():
        assert np.isfinite(r["log10_volume"]) and r["log10_volume"] <= r["max_sample_log10"] + 1e-9
        n = summary["config"]["n_params"]
        assert r["log10_prior_at_anchor"] == pytest.approx(-n * r["anchor_rms"] ** 2 / (
            2 * summary["config"]["sigma"] ** 2) / math.log(10), rel=1e-9)
    # cutoffs below float64_below are evaluated by a float64 copy of the network
    assert summary["estimates"]["cutoff_clean_adam_0"]["dtype"] == "float64"  # cutoff 1e-2
    assert summary["estimates"]["cutoff_clean_adam_1"]["dtype"] == "float32"  # cutoff 1.0
    assert summary["estimates"]["hist_poisoned_naive"]["dtype"] == "float64"  # cutoff 1e-2 too
    metrics = json.loads(Path("results/convnext/estimate_metrics.json").read_text())
    assert isinstance(metrics["poisoned_smaller_naive"], bool)
    for name in ("figure3_convnext", "figure5_convnext", "figure7_convnext"):
        for suffix in ("png", "pdf"):
            assert Path(f"figures/{name}.{suffix}").stat().st_size > 1000
    assert "JPEG copy" in Path("figures/convnext_aggregates.md").read_text()


@pytest.mark.parametrize("change, match", [
    ({"k_histogram": 0}, "k_histogram must be ≥ 1, got 0"),
    ({"n_eval": 0}, "n_eval must be ≥ 1"),
    ({"cutoffs": [1e-2, 1e-3]}, "increasing"),
    ({"cutoffs": [0.0, 1.0]}, "positive"),
    ({"adam_eps": -1.0}, "adam_eps"),
    ({"float64_below": -1.0}, "float64_below"),
])
def test_estimate_stage_rejects_bad_settings_before_reading_anything(tmp_path, change, match):
    settings = dict(dataset_path=str(tmp_path / "missing.npz"), checkpoints_dir=str(tmp_path),
                    estimates_path="e.json", metrics_path="m.json", samples_path="s.npz",
                    checkpoint_dir=str(tmp_path), n_eval=4, data_batch_size=4,
                    direction_batch_size=2, vectorize=False, cutoff=1e-2, rtol=1e-2, seed=0,
                    exponent=0.5, adam_eps=1e-5, k_checkpoints=1, k_histogram=1,
                    cutoffs=[1e-2, 1.0], k_cutoffs=1, float64_below=1e-5)
    with pytest.raises(ValueError, match=match):
        convnext.estimate_stage(**{**settings, **change})
