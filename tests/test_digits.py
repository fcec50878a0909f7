"""Digits data, split, MLP and training (REPLICATION.md §5.1)."""

import hashlib
import math

import numpy as np
import pytest
import torch

from localvol import digits


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    digits.write_raw_data(out)
    return out


def test_raw_data_is_a_byte_copy_of_sklearns_and_idempotent(data_dir):
    path = data_dir / digits.DIGITS_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digits.DIGITS_SHA256
    mtime = path.stat().st_mtime_ns
    digits.write_raw_data(data_dir)  # second call leaves the file alone
    assert path.stat().st_mtime_ns == mtime


def test_raw_data_refuses_to_overwrite_a_different_file(tmp_path):
    (tmp_path / digits.DIGITS_FILE).write_bytes(b"not the digits")
    with pytest.raises(RuntimeError, match="sha256"):
        digits.write_raw_data(tmp_path)


def test_load_digits_matches_sklearn(data_dir):
    from sklearn.datasets import load_digits

    images, labels = digits.load_digits(data_dir)
    ref = load_digits()
    assert images.shape == (1797, 64) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(images, (ref.data / 16).astype(np.float32))
    np.testing.assert_array_equal(labels, ref.target)


def test_split_is_seeded_disjoint_and_complete():
    train, held = digits.split_indices(1797, 1024, seed=0)
    assert len(train) == 1024 and len(held) == 773
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(1797))
    again, _ = digits.split_indices(1797, 1024, seed=0)
    other, _ = digits.split_indices(1797, 1024, seed=1)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)
    with pytest.raises(ValueError):
        digits.split_indices(10, 10, seed=0)


def test_split_stage_saves_indices(data_dir, tmp_path):
    summary = digits.split_stage(data_dir=str(data_dir), split_path=str(tmp_path / "s.npz"),
                                 seed=0, n_train=1024)
    assert summary["n_train"] == 1024 and summary["n_heldout"] == 773
    assert sum(summary["class_counts"]["heldout"]) == 773
    train, held = digits.load_split(tmp_path / "s.npz")
    np.testing.assert_array_equal(train, digits.split_indices(1797, 1024, 0)[0])


def test_mlp_has_4810_parameters_and_tanh_gelu():
    model = digits.build_mlp()
    assert digits.count_parameters(model) == 64 * 64 + 64 + 64 * 10 + 10 == 4810
    assert model[1].approximate == "tanh"
    x = torch.randn(5, 64)
    assert model(x).shape == (5, 10)


def test_init_is_normal_with_variance_one_over_fan_in():
    model = digits.init_mlp_(digits.build_mlp(hidden=512), torch.Generator().manual_seed(0))
    first, last = model[0], model[2]
    for layer in (first, last):
        fan_in = layer.in_features
        w = layer.weight.detach().flatten()
        assert abs(w.mean()) < 4 / math.sqrt(w.numel() * fan_in)
        assert w.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.05)
    # biases too: 512 draws of N(0, 1/64) for the first layer
    assert first.bias.std().item() == pytest.approx(1 / 8, rel=0.15)


def test_cosine_schedule_matches_optax():
    f = digits._cosine_decay(400)
    assert f(0) == 1.0
    assert f(200) == pytest.approx(0.5)
    assert f(400) == pytest.approx(0.0) and f(500) == pytest.approx(0.0)


def test_training_is_deterministic_and_learns(data_dir, tmp_path):
    images, labels = digits.load_digits(data_dir)
    train, held = digits.split_indices(len(images), 1024, 0)
    kwargs = dict(hidden=16, epochs=3, seed=0)
    r1 = digits.train_mlp(images[train], labels[train], images[held], labels[held], **kwargs)
    r2 = digits.train_mlp(images[train], labels[train], images[held], labels[held], **kwargs)
    for p, q in zip(r1.model.parameters(), r2.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert r1.metrics["steps"] == 3 * 16
    assert r1.metrics["heldout_accuracy"] > 0.8
    assert r1.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at the end
    assert r1.metrics["n_parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    # Adam's settings as the paper's: β (0.9, 0.999), ε 1e-8, no decoupled weight decay
    group = r1.optimizer.state_dict()["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0


def test_save_and_load_round_trip(data_dir, tmp_path):
    images, labels = digits.load_digits(data_dir)
    result = digits.train_mlp(images[:200], labels[:200], images[200:300], labels[200:300],
                              hidden=8, epochs=1, seed=1)
    digits.save_trained(tmp_path / "m", result)
    model, opt_state = digits.load_trained(tmp_path / "m")
    for p, q in zip(result.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    saved = result.optimizer.state_dict()["state"]
    for i in saved:
        torch.testing.assert_close(opt_state["state"][i]["exp_avg_sq"], saved[i]["exp_avg_sq"])
    assert not model.training


def test_train_stage_writes_everything(data_dir, tmp_path):
    split = tmp_path / "split.npz"
    digits.split_stage(data_dir=str(data_dir), split_path=str(split), seed=0, n_train=1024)
    digits.train_stage(data_dir=str(data_dir), split_path=str(split),
                       model_dir=str(tmp_path / "model"), metrics_path=str(tmp_path / "m.json"),
                       history_path=str(tmp_path / "h.csv"), seed=0, hidden=4, lr=0.05,
                       epochs=1, batch_size=64, l2=5e-4, betas=[0.9, 0.999], adam_eps=1e-8)
    import json

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss"}
    assert (tmp_path / "h.csv").read_text().startswith("epoch,")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {
        digits.MODEL_FILE, digits.OPTIMIZER_FILE, digits.CONFIG_FILE}


def test_cli_writes_data(tmp_path):
    digits.main(["write-data", str(tmp_path / "d")])
    assert (tmp_path / "d" / digits.DIGITS_FILE).exists()
