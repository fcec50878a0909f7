"""Digits data and split (replication.mlp.data; docs/experiments.md#figure-1)."""

import hashlib

import numpy as np
import pytest

from replication.mlp import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    data.write_raw_data(out)
    return out


def test_raw_data_is_a_byte_copy_of_sklearns_and_idempotent(data_dir):
    path = data_dir / data.DIGITS_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.DIGITS_SHA256
    mtime = path.stat().st_mtime_ns
    data.write_raw_data(data_dir)  # second call leaves the file alone
    assert path.stat().st_mtime_ns == mtime


def test_raw_data_refuses_to_overwrite_a_different_file(tmp_path):
    (tmp_path / data.DIGITS_FILE).write_bytes(b"not the digits")
    with pytest.raises(RuntimeError, match="sha256"):
        data.write_raw_data(tmp_path)


def test_load_digits_matches_sklearn(data_dir):
    from sklearn.datasets import load_digits

    images, labels = data.load_digits(data_dir)
    ref = load_digits()
    assert images.shape == (1797, 64) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(images, (ref.data / 16).astype(np.float32))
    np.testing.assert_array_equal(labels, ref.target)


def test_split_is_seeded_disjoint_and_complete():
    train, held = data.split_indices(1797, 1024, seed=0)
    assert len(train) == 1024 and len(held) == 773
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(1797))
    again, _ = data.split_indices(1797, 1024, seed=0)
    other, _ = data.split_indices(1797, 1024, seed=1)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)
    with pytest.raises(ValueError, match="split_digits.n_train"):
        data.split_indices(10, 10, seed=0)


def test_split_stage_saves_indices(data_dir, tmp_path):
    summary = data.split_stage(data_dir=str(data_dir), split_path=str(tmp_path / "s.npz"),
                               seed=0, n_train=1024)
    assert summary["n_train"] == 1024 and summary["n_heldout"] == 773
    assert sum(summary["class_counts"]["heldout"]) == 773
    train, held = data.load_split(tmp_path / "s.npz")
    np.testing.assert_array_equal(train, data.split_indices(1797, 1024, 0)[0])
    parts = data.load_split_data(data_dir, tmp_path / "s.npz")
    images, labels = data.load_digits(data_dir)
    np.testing.assert_array_equal(parts["heldout_images"], images[held])
    np.testing.assert_array_equal(parts["train_labels"], labels[train])


def test_cli_writes_data(tmp_path):
    data.main(["write-data", str(tmp_path / "d")])
    assert (tmp_path / "d" / data.DIGITS_FILE).exists()


def test_module_runs_as_a_script(tmp_path):
    """``python -m replication.mlp.data write-data`` (what ``make data`` runs)."""
    import os
    import subprocess
    import sys

    lib = str(__import__("pathlib").Path(data.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": lib}
    subprocess.run([sys.executable, "-m", "replication.mlp.data", "write-data",
                    str(tmp_path / "d")], check=True, env=env, capture_output=True)
    assert (tmp_path / "d" / data.DIGITS_FILE).exists()
