"""Shared by the ConvNeXt tests: a tiny network, synthetic CIFAR-shaped data, and tiny trained
checkpoints (both runs, steps 0, 1, 2) made once per session."""
import numpy as np
import pytest

TINY_NET = {"hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1]}


def make_synthetic_data(n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    return {"train_images": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
            "train_labels": rng.integers(0, 10, n_train),
            "test_images": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
            "test_labels": rng.integers(0, 10, n_test),
            "clean_idx": np.arange(0, n_train, 2), "poison_idx": np.arange(1, n_train, 2),
            "eval_idx": rng.permutation(n_test), "source": "synthetic"}


@pytest.fixture
def synthetic_data():
    return make_synthetic_data()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """(dataset_path, checkpoints_dir) of a tiny train_convnext run on synthetic data."""
    from replication.convnext.train import train_stage
    from replication.pipeline import save_npz_atomic

    root = tmp_path_factory.mktemp("convnext")
    data = make_synthetic_data()
    save_npz_atomic(root / "dataset.npz", **{k: v for k, v in data.items() if k != "source"},
                    source=np.array(data["source"]))
    train_stage(dataset_path=str(root / "dataset.npz"), checkpoints_dir=str(root / "ckpt"),
                metrics_path=str(root / "train_metrics.json"),
                history_path=str(root / "train_history.csv"),
                runs={"clean": {"poison_probability": 0.0}, "poisoned": {"poison_probability": 0.4}},
                max_steps=2, batch_size=4, lr=1e-3, betas=[0.9, 0.95], adam_eps=1e-8,
                weight_decay=0.05, warmup=1, max_grad_norm=1.0, seed=0, n_curve=6,
                model_overrides=TINY_NET, progress=False)
    return str(root / "dataset.npz"), str(root / "ckpt")


@pytest.fixture
def tiny_net():
    """model_overrides of a tiny ConvNeXt V2 (the tiny profile's)."""
    return dict(TINY_NET)
