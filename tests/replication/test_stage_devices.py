"""The ``device`` key of train_convnext, convnext_estimate and pythia_estimate reaches the stage
functions: "cuda" on a machine without a GPU (here: faked) is an error naming the key, raised
before any input is read (the inputs here do not exist)."""
import pytest
import torch

from replication.convnext import estimate as convnext_estimate
from replication.convnext import train
from replication.pythia import estimate as pythia_estimate
from replication.pythia import points


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_train_convnext_device(tmp_path, no_gpu):
    kw = dict(dataset_path=str(tmp_path / "missing.npz"), checkpoints_dir=str(tmp_path / "c"),
              metrics_path=str(tmp_path / "m.json"), history_path=str(tmp_path / "h.csv"), runs={"clean": {"poison_probability": 0.0}},
              max_steps=2, batch_size=2, lr=1e-3, betas=[0.9, 0.95], adam_eps=1e-8,
              weight_decay=0.05, warmup=1, max_grad_norm=1.0, seed=0, n_curve=2, progress=False)
    with pytest.raises(ValueError, match=r"train_convnext\.device is 'cuda' but PyTorch sees no"):
        train.train_stage(device="cuda", **kw)
    with pytest.raises(ValueError, match=r"train_convnext\.device must be one of"):
        train.train_stage(device="gpu", **kw)
    with pytest.raises(FileNotFoundError):  # "auto" gets past the device, to the missing data
        train.train_stage(device="auto", **kw)


@pytest.mark.parametrize("stage", ["figure3", "figure5", "figure7"])
def test_convnext_estimate_device(tmp_path, no_gpu, stage):
    figure = {"cutoffs": [1e-2, 1.0]} if stage == "figure7" else {"cutoff": 1e-2}
    kw = dict(dataset_path=str(tmp_path / "missing.npz"), checkpoints_dir=str(tmp_path),
              estimates_path=str(tmp_path / "e.json"), samples_path=str(tmp_path / "s.npz"),
              metrics_path=str(tmp_path / "m.json"), progress_dir=str(tmp_path / "p"), n_eval=4,
              data_batch_size=4, direction_batch_size=2, vectorize=False, rtol=1e-2, seed=0,
              exponent=0.5, float64_below=0.1, progress=False, adam_eps=1e-5, k=1, **figure)
    with pytest.raises(ValueError, match=r"convnext_estimate\.device is 'cuda'"):
        getattr(convnext_estimate, f"{stage}_stage")(device="cuda", **kw)
    with pytest.raises(FileNotFoundError):
        getattr(convnext_estimate, f"{stage}_stage")(device="cpu", **kw)


SHARED = dict(checkpoints_dir="missing-checkpoints", estimates_path="e.json",
              samples_path="s.npz", progress_dir="progress", metrics_path="m.json",
              eval_source="local", n_eval_docs=2, max_eval_tokens=16, data_batch_size=2,
              direction_batch_size=8, rtol=1e-2, seed=0, exponent=0.5,
              adam_source="optimizer_state", raw_checkpoint_dir="", sqgrad_batches=2,
              sqgrad_batch_size=2, sqgrad_seq_len=16, sqgrad_beta2=0.95, progress=False)


@pytest.mark.parametrize("stage, figure", [
    (pythia_estimate.figure4_stage, dict(cutoff=1e-2, adam_eps=1e-5, k=2)),
    (pythia_estimate.figure2_stage, dict(cutoff=1e-2, adam_eps=1e-5, k=2,
                                         compare_squared_gradients=False)),
    (pythia_estimate.figure6_stage, dict(cutoffs=[1e-2, 1.0], adam_eps=[1e-5], k=2)),
])
def test_pythia_estimate_device(tmp_path, no_gpu, monkeypatch, stage, figure):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"pythia_estimate\.device is 'cuda'"):
        stage(device="cuda", **figure, **SHARED)
    with pytest.raises(FileNotFoundError, match="manifest"):
        stage(device="auto", **figure, **SHARED)


def test_pythia_config_records_the_resolved_device_only():
    """The settings' device ("auto") stays out of the estimates JSON's config: Setup.config
    records the resolved one, so a default run writes the same JSON as before the key existed."""
    assert "device" not in points.EstimateSettings(**SHARED, device="auto").config()
