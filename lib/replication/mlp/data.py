"""UCI digits data and its seeded train / held-out split (docs/experiments.md#figure-1).

Data: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" test
set (Alpaydin & Kaynak 1998): 1,797 images of 8×8 pixels with integer values 0..16, stored as
``digits.csv.gz`` (64 pixel columns, then the label). :func:`write_raw_data` copies that file
byte for byte into ``data/`` so that ``data.dvc`` hashes the same bytes on every machine.

Split: the first ``n_train`` images of ``numpy.random.default_rng(seed).permutation(1797)``
train the MLP, the other 773 (with the default 1,024) are held out: they are the evaluation
data of the KL cost.

Command line (used by ``make data``)::

    python -m replication.mlp.data write-data data/digits
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np

from replication.pipeline.files import save_npz_atomic

__all__ = [
    "DIGITS_FILE",
    "DIGITS_SHA256",
    "N_DIGITS",
    "N_PIXELS",
    "N_CLASSES",
    "write_raw_data",
    "load_digits",
    "split_indices",
    "save_split",
    "load_split",
    "load_split_data",
    "split_stage",
    "main",
]

DIGITS_FILE = "digits.csv.gz"
# sha256 of sklearn/datasets/data/digits.csv.gz as shipped by the pinned scikit-learn.
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
N_DIGITS = 1797
N_PIXELS = 64
N_CLASSES = 10


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sklearn_digits_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("sklearn.datasets") / "data" / DIGITS_FILE))


def write_raw_data(out_dir: str | Path) -> Path:
    """Copy scikit-learn's bundled ``digits.csv.gz`` into ``out_dir`` byte for byte.

    Idempotent: an existing file with the right checksum is left alone; a file with the wrong
    checksum is an error (never silently overwritten). Returns the written path.

    Raises:
        RuntimeError: ``out_dir/digits.csv.gz`` exists with another sha256, or the installed
            scikit-learn ships a different file than the pinned one.
    """
    out_dir = Path(out_dir)
    target = out_dir / DIGITS_FILE
    if target.exists():
        if _sha256(target) != DIGITS_SHA256:
            raise RuntimeError(
                f"{target} exists but its sha256 is not the expected {DIGITS_SHA256}; "
                "remove it (or run `dvc checkout data.dvc`) and retry"
            )
        return target
    source = _sklearn_digits_path()
    if _sha256(source) != DIGITS_SHA256:
        raise RuntimeError(
            f"scikit-learn's bundled {source} has an unexpected sha256; "
            "install the pinned scikit-learn (see pyproject.toml)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def load_digits(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``data_dir/digits.csv.gz``.

    Returns:
        images: (1797, 64) float32, pixel values / 16, so in [0, 1].
        labels: (1797,) int64 in 0..9.

    Raises:
        ValueError: the table is not 1,797 rows of 65 columns.
    """
    path = Path(data_dir) / DIGITS_FILE
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # (1797, 65): 64 pixels (0..16), label
    if table.shape != (N_DIGITS, N_PIXELS + 1):
        raise ValueError(f"{path}: expected shape {(N_DIGITS, N_PIXELS + 1)}, got {table.shape}")
    images = (table[:, :N_PIXELS] / 16.0).astype(np.float32)
    labels = table[:, N_PIXELS].astype(np.int64)
    return images, labels


def split_indices(n: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)``: the first ``n_train`` of one permutation train,
    the rest held out (the paper's code used a JAX permutation with key 0; this one is
    ``numpy.random.default_rng(seed).permutation(n)``).

    Returns (train_idx (n_train,), heldout_idx (n - n_train,)), both int64.

    Raises:
        ValueError: ``n_train`` not in (0, n) (params.yaml ``split_digits.n_train``).
    """
    if not 0 < n_train < n:
        raise ValueError(f"n_train must be in (0, {n}), got {n_train}: change "
                         f"split_digits.n_train in params.yaml")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return perm[:n_train], perm[n_train:]


def save_split(path: str | Path, train_idx: np.ndarray, heldout_idx: np.ndarray, seed: int) -> None:
    """Write the split atomically: NPZ of ``train_idx``, ``heldout_idx`` (int64) and ``seed``."""
    save_npz_atomic(path, train_idx=train_idx, heldout_idx=heldout_idx, seed=np.int64(seed))


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train_idx, heldout_idx) saved by :func:`save_split`."""
    with np.load(path) as z:
        return z["train_idx"], z["heldout_idx"]


def load_split_data(data_dir: str | Path, split_path: str | Path) -> dict[str, np.ndarray]:
    """The digits divided by the saved split: ``train_images`` (n_train, 64) float32,
    ``train_labels`` (n_train,) int64, ``heldout_images`` and ``heldout_labels`` likewise."""
    images, labels = load_digits(data_dir)
    train_idx, heldout_idx = load_split(split_path)
    return {"train_images": images[train_idx], "train_labels": labels[train_idx],
            "heldout_images": images[heldout_idx], "heldout_labels": labels[heldout_idx]}


def split_stage(*, data_dir: str, split_path: str, seed: int, n_train: int) -> dict:
    """The ``split_digits`` stage: write the seeded train/held-out indices to ``split_path``.

    Returns a summary: sizes and per-class counts of each split (``class_counts``: split name
    -> 10 counts)."""
    images, labels = load_digits(data_dir)
    train_idx, heldout_idx = split_indices(len(images), n_train, seed)
    save_split(split_path, train_idx, heldout_idx, seed)
    counts = {name: np.bincount(labels[idx], minlength=N_CLASSES).tolist()
              for name, idx in (("train", train_idx), ("heldout", heldout_idx))}
    return {"n_images": len(images), "n_train": len(train_idx), "n_heldout": len(heldout_idx),
            "class_counts": counts}


def main(argv: list[str] | None = None) -> None:
    """``python -m replication.mlp.data write-data OUT_DIR``: :func:`write_raw_data`."""
    parser = argparse.ArgumentParser(prog="python -m replication.mlp.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-data", help="copy scikit-learn's bundled digits.csv.gz")
    write.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write-data":
        print(write_raw_data(args.out_dir))


if __name__ == "__main__":
    main()
