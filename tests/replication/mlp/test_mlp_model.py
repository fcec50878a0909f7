"""The digits MLP, its training and saving (replication.mlp.model;
docs/experiments.md#figure-1)."""

import json
import math

import pytest
import torch

from replication.mlp import data, model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    data.write_raw_data(out)
    return out


def test_mlp_has_4810_parameters_and_tanh_gelu():
    mlp = model.build_mlp()
    assert model.count_parameters(mlp) == 64 * 64 + 64 + 64 * 10 + 10 == 4810
    assert mlp[1].approximate == "tanh"
    x = torch.randn(5, 64)
    assert mlp(x).shape == (5, 10)


def test_init_is_normal_with_variance_one_over_fan_in():
    mlp = model.init_mlp_(model.build_mlp(hidden=512), torch.Generator().manual_seed(0))
    first, last = mlp[0], mlp[2]
    for layer in (first, last):
        fan_in = layer.in_features
        w = layer.weight.detach().flatten()
        assert abs(w.mean()) < 4 / math.sqrt(w.numel() * fan_in)
        assert w.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.05)
    # biases too: 512 draws of N(0, 1/64) for the first layer
    assert first.bias.std().item() == pytest.approx(1 / 8, rel=0.15)


def test_cosine_schedule_matches_optax():
    f = model._cosine_decay(400)
    assert f(0) == 1.0
    assert f(200) == pytest.approx(0.5)
    assert f(400) == pytest.approx(0.0) and f(500) == pytest.approx(0.0)


def test_training_is_deterministic_and_learns(data_dir):
    images, labels = data.load_digits(data_dir)
    train, held = data.split_indices(len(images), 1024, 0)
    kwargs = dict(hidden=16, epochs=3, seed=0)
    r1 = model.train_mlp(images[train], labels[train], images[held], labels[held], **kwargs)
    r2 = model.train_mlp(images[train], labels[train], images[held], labels[held], **kwargs)
    for p, q in zip(r1.model.parameters(), r2.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert r1.metrics["steps"] == 3 * 16
    assert [row["step"] for row in r1.history] == [16, 32, 48]
    assert r1.metrics["heldout_accuracy"] > 0.8
    assert r1.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at the end
    assert r1.metrics["n_parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    # Adam's settings as the paper's: β (0.9, 0.999), ε 1e-8, no decoupled weight decay
    group = r1.optimizer.state_dict()["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0


@pytest.mark.parametrize("setting, key", [({"epochs": 0}, "train_mlp.epochs"),
                                          ({"batch_size": 2.5}, "train_mlp.batch_size"),
                                          ({"lr": 0.0}, "train_mlp.lr"),
                                          ({"l2": -1.0}, "train_mlp.l2"),
                                          ({"betas": (0.9,)}, "train_mlp.betas"),
                                          ({"adam_eps": 0.0}, "train_mlp.adam_eps")])
def test_bad_training_settings_name_their_key(setting, key):
    x = torch.zeros(4, 64).numpy()
    y = torch.zeros(4, dtype=torch.int64).numpy()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        model.train_mlp(x, y, x, y, **setting)


def test_save_and_load_round_trip(data_dir, tmp_path):
    images, labels = data.load_digits(data_dir)
    result = model.train_mlp(images[:200], labels[:200], images[200:300], labels[200:300],
                             hidden=8, epochs=1, seed=1)
    model.save_trained(tmp_path / "m", result)
    mlp, opt_state = model.load_trained(tmp_path / "m")
    for p, q in zip(result.model.parameters(), mlp.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    saved = result.optimizer.state_dict()["state"]
    for i in saved:
        torch.testing.assert_close(opt_state["state"][i]["exp_avg_sq"], saved[i]["exp_avg_sq"])
    assert not mlp.training
    # the optimizer file's bytes depend only on the state, not on the (random) temporary path
    first = (tmp_path / "m" / model.OPTIMIZER_FILE).read_bytes()
    model.save_trained(tmp_path / "again", result)
    assert (tmp_path / "again" / model.OPTIMIZER_FILE).read_bytes() == first


def test_train_stage_writes_everything(data_dir, tmp_path):
    split = tmp_path / "split.npz"
    data.split_stage(data_dir=str(data_dir), split_path=str(split), seed=0, n_train=1024)
    model.train_stage(data_dir=str(data_dir), split_path=str(split),
                      model_dir=str(tmp_path / "model"), metrics_path=str(tmp_path / "m.json"),
                      history_path=str(tmp_path / "h.csv"), seed=0, hidden=4, lr=0.05,
                      epochs=1, batch_size=64, l2=5e-4, betas=[0.9, 0.999], adam_eps=1e-8)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss"}
    assert "wall_time_s" not in metrics  # in m.timings.json, outside DVC
    assert json.loads((tmp_path / "m.timings.json").read_text())["wall_time_s"] > 0
    assert (tmp_path / "h.csv").read_text().startswith("epoch,")
    assert {p.name for p in (tmp_path / "model").iterdir()} == {
        model.MODEL_FILE, model.OPTIMIZER_FILE, model.CONFIG_FILE}
