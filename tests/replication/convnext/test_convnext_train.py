"""ConvNeXt training (replication.convnext.train, .checkpoints), offline and on CPU: the
checkpoint steps, exact resumption, restarting on changed settings, Adam ν mapped by name, the
manifest's weight hashes and the lr-0 first-update allowance."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import localvol
from replication.convnext import checkpoints, train
from replication.sweep import code_version


def _train_kwargs(tiny_net):
    return dict(poison_probability=0.4, max_steps=4, batch_size=4, lr=1e-3, betas=(0.9, 0.95),
                adam_eps=1e-8, weight_decay=0.05, warmup=1, max_grad_norm=1.0, seed=0, n_curve=6,
                model_overrides=tiny_net, progress=False)


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / f"step{step}" / "model.safetensors")


def test_log_spaced_steps():
    assert checkpoints.log_spaced_steps(16) == [0, 1, 2, 4, 8, 16]
    assert checkpoints.log_spaced_steps(65536)[-3:] == [16384, 32768, 65536]
    assert len(checkpoints.log_spaced_steps(65536)) == 18  # the paper's 17 plus step 0
    assert checkpoints.log_spaced_steps(12) == [0, 1, 2, 4, 8, 12]
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="max_steps .*train_convnext.max_steps"):
            checkpoints.log_spaced_steps(bad)


def test_interrupted_training_resumes_exactly(tmp_path, synthetic_data, tiny_net):
    kw = _train_kwargs(tiny_net)
    straight = tmp_path / "straight"
    history = train.train_run(straight, synthetic_data, **kw)
    assert [h["step"] for h in history] == [0, 1, 2, 4]
    assert {"clean_accuracy", "poison_loss", "val_accuracy", "train_loss"} <= set(history[-1])

    # an interruption after the step-2 checkpoint: step4/ never written
    resumed = tmp_path / "resumed"
    train.train_run(resumed, synthetic_data, **kw)
    shutil.rmtree(resumed / "step4")
    history2 = train.train_run(resumed, synthetic_data, **kw)
    assert [h["step"] for h in history2] == [0, 1, 2, 4]
    assert history2 == history  # the same curves and weight hashes
    a, b = _weights(straight, 4), _weights(resumed, 4)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # the training went somewhere
    w0 = _weights(straight, 0)
    assert any(not torch.equal(w0[n], a[n]) for n in a)


def test_changed_settings_start_the_run_over_and_adam_state_maps_by_name(tmp_path, synthetic_data,
                                                                         tiny_net):
    kw = _train_kwargs(tiny_net)
    train.train_run(tmp_path / "run", synthetic_data, **{**kw, "max_steps": 2})
    before = _weights(tmp_path / "run", 2)
    train.train_run(tmp_path / "run", synthetic_data, **{**kw, "max_steps": 2, "lr": 2e-3})
    after = _weights(tmp_path / "run", 2)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 2e-3
    assert any(not torch.equal(before[n], after[n]) for n in before)
    model, state = checkpoints.load_checkpoint(tmp_path, "run", 2)
    nu = localvol.adam_moment(model, state, order=2)
    assert nu.shape == (sum(p.numel() for p in model.parameters()),) and bool((nu > 0).all())
    # ν of the classifier bias, found by name although the optimizer groups reorder parameters
    names = [n for n, _ in model.named_parameters()]
    offset = sum(p.numel() for n, p in model.named_parameters() if names.index(n) < names.index("classifier.bias"))
    sid = [i for g in state["param_groups"] for i, n in zip(g["params"], g["param_names"])
           if n == "classifier.bias"][0]
    torch.testing.assert_close(nu[offset:offset + 10], state["state"][sid]["exp_avg_sq"])


def test_run_config_keeps_its_keys_and_order(tmp_path, synthetic_data, tiny_net):
    """config.json is part of the checkpoints DVC hashes: same keys, same order as ever."""
    train.train_run(tmp_path / "run", synthetic_data, **{**_train_kwargs(tiny_net), "max_steps": 1})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert list(config) == ["code_version", "poison_probability", "max_steps", "batch_size",
                            "lr", "betas", "adam_eps", "weight_decay", "warmup", "max_grad_norm",
                            "seed", "n_curve", "model_overrides", "data_source", "data_sha256",
                            "device_type"]
    assert config["code_version"] == code_version() and len(config["code_version"]) == 64


def test_a_finished_run_from_other_code_is_started_over(tmp_path, synthetic_data, tiny_net,
                                                        monkeypatch):
    """Checkpoints persist between `dvc repro` runs; after any source edit the run must train
    again instead of resuming (or reusing) weights that other code produced."""
    kwargs = {**_train_kwargs(tiny_net), "max_steps": 1}
    train.train_run(tmp_path / "run", synthetic_data, **kwargs)
    marker = tmp_path / "run" / "step1" / "from-old-code"
    marker.write_text("")
    train.train_run(tmp_path / "run", synthetic_data, **kwargs)  # same code: resumed, kept
    assert marker.exists()
    monkeypatch.setattr(train, "code_version", lambda: "0" * 64)  # the source changed
    train.train_run(tmp_path / "run", synthetic_data, **kwargs)
    assert not marker.exists()  # started over
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["code_version"] == "0" * 64


@pytest.mark.parametrize("change, match", [
    ({"batch_size": 0}, "batch_size .*train_convnext.batch_size"),
    ({"warmup": 9}, "warmup .*train_convnext.warmup"),
    ({"betas": (0.9, 1.0)}, "betas .*train_convnext.betas"),
    ({"max_grad_norm": -1.0}, "max_grad_norm .*train_convnext.max_grad_norm"),
])
def test_bad_training_settings_name_the_params_key(tmp_path, synthetic_data, tiny_net, change, match):
    with pytest.raises(ValueError, match=match):
        train.train_run(tmp_path / "run", synthetic_data, **{**_train_kwargs(tiny_net), **change})
    assert not (tmp_path / "run").exists()


def test_manifest_hashes_the_weights_and_allows_the_lr0_first_update(tiny_checkpoints):
    _, ckpt = tiny_checkpoints
    manifest = checkpoints.read_manifest(ckpt)
    assert manifest["steps"] == [0, 1, 2] and set(manifest["runs"]) == {"clean", "poisoned"}
    for run in manifest["runs"]:
        hashes = [h["parameter_sha256"] for h in manifest["runs"][run]["history"]]
        assert hashes[0] == hashes[1] != hashes[2]  # warm-up from lr 0: step 1 = step 0
        for step in (0, 2):
            model, _ = checkpoints.load_checkpoint(ckpt, run, step)
            checkpoints.verify_weights(model, manifest, run, step)
    with pytest.raises(ValueError, match="other weights"):
        checkpoints.verify_weights(model, manifest, "poisoned", 1)
    del manifest["runs"]["clean"]["history"][1]["parameter_sha256"]
    with pytest.raises(ValueError, match="no parameter hash"):
        checkpoints.verify_weights(model, manifest, "clean", 1)


def test_train_stage_refuses_bad_runs(tmp_path):
    with pytest.raises(ValueError, match="runs is empty.*train_convnext.runs"):
        train.train_stage(dataset_path="missing.npz", checkpoints_dir=str(tmp_path),
                          metrics_path="m.json", history_path="h.csv", runs={}, max_steps=2, batch_size=4, lr=1e-3,
                          betas=[0.9, 0.95], adam_eps=1e-8, weight_decay=0.05, warmup=1,
                          max_grad_norm=1.0, seed=0, n_curve=6)
    np.testing.assert_equal(list(tmp_path.iterdir()), [])
