"""CIFAR-10 for the ConvNeXt experiment (paper §4.2; docs/experiments.md#convnext): loading and
the clean/poison split (stage ``prepare_cifar``, :func:`prepare_stage`).

Two sources, one result (uint8 images (n, 3, 32, 32) and int64 labels 0-9):

- ``torchvision.datasets.CIFAR10(download_root, download=True)``: the real dataset (paper
  profile; needs the internet, unless ``download_root`` already holds it). Also the fallback
  when ``prepare_cifar.local_copy`` names a folder that does not exist; the recorded ``source``
  then says "torchvision CIFAR-10", as for ``local_copy: ""``;
- a local copy of JPEG trees ``{train,test}/<class>/NNNN.jpg`` (as ``train.tar.gz`` /
  ``test.tar.gz`` or extracted folders), e.g. the offline mirror in ``../shared/data/cifar10-jpeg``.
  JPEG (quality ≈ 75) differs from the original pixels (mean absolute error ≈ 7.4/255), so every
  result computed from it is labelled "JPEG copy". Class folders sorted alphabetically give the
  standard label order; within a class, files keep the original order, but the classes are not
  interleaved as in the original test set, so "the first n_eval test images" are taken from a
  seeded permutation of the test set for this source (the original order is unrecoverable).

The 50,000 training images are split once, seeded, into ``n_clean`` clean and the rest poison
images (the paper's code: 30,000 / 20,000, ``train_test_split(seed=42)``); the indices are saved.
"""
from __future__ import annotations

import io
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from replication.pipeline import save_npz_atomic

__all__ = ["CLASSES", "TORCHVISION_SOURCE", "load_cifar10", "read_jpeg_copy", "split_indices",
           "prepare_stage", "load_prepared"]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
TORCHVISION_SOURCE = "torchvision CIFAR-10"  # the recorded source of the real dataset
_JPEG = re.compile(r"^(?:.*/)?(train|test)/([a-z]+)/(\d+)\.jpe?g$")


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (32, 32, 3):
        raise ValueError(f"CIFAR-10 images are 32x32 RGB, got shape {arr.shape}")
    return arr


def read_jpeg_copy(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split (``"train"`` or ``"test"``) of a JPEG-tree copy of CIFAR-10.

    Args:
        path: folder holding ``{split}.tar.gz`` or an extracted ``{split}/<class>/NNNN.jpg``
            tree. Class folders must be the CIFAR-10 class names (:data:`CLASSES`).

    Returns:
        images: (n, 3, 32, 32) uint8; labels: (n,) int64, ordered by class, then file number.

    Raises:
        FileNotFoundError: neither the archive nor the folder exists.
        ValueError: an unknown class folder, a non-32x32 image, or an empty split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    items: list[tuple[int, int, bytes]] = []

    def add(name: str, read):
        m = _JPEG.match(name)
        if not m or m.group(1) != split:
            return
        if m.group(2) not in CLASSES:
            raise ValueError(f"{name}: class folder {m.group(2)!r} is not a CIFAR-10 class {CLASSES}")
        items.append((CLASSES.index(m.group(2)), int(m.group(3)), read()))

    archive, folder = path / f"{split}.tar.gz", path / split
    if archive.exists():
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile():
                    add(member.name, lambda: tar.extractfile(member).read())
    elif folder.is_dir():
        for f in sorted(folder.glob("*/*")):
            add(f"{split}/{f.parent.name}/{f.name}", f.read_bytes)
    else:
        raise FileNotFoundError(f"CIFAR-10 JPEG copy: neither {archive} nor {folder}/ exists "
                                "(params.yaml prepare_cifar.local_copy)")
    if not items:
        raise ValueError(f"no {split}/<class>/NNNN.jpg images under {path}")
    items.sort(key=lambda t: (t[0], t[1]))
    images = np.stack([_decode(b) for _, _, b in items]).transpose(0, 3, 1, 2)
    labels = np.array([c for c, _, _ in items], dtype=np.int64)
    return np.ascontiguousarray(images), labels


def _torchvision_split(download_root: str | Path, train: bool,
                       local_copy: str | Path = "") -> tuple[np.ndarray, np.ndarray]:
    """One split of ``torchvision.datasets.CIFAR10(download=True)`` as CHW uint8 and int64.
    ``local_copy``: the absent copy this falls back from ("" if none was named), for the
    error message."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(download_root), train=train, download=True)
    except Exception as err:  # no internet, no space, a bad mirror
        absent = (f"prepare_cifar.local_copy {local_copy} does not exist, and " if local_copy
                  else "")
        raise RuntimeError(
            f"{absent}torchvision could not download CIFAR-10 into prepare_cifar.download_root "
            f"{download_root} ({err!r}); offline, point prepare_cifar.local_copy (params.yaml) "
            "at a JPEG copy such as ../shared/data/cifar10-jpeg, or put the extracted dataset "
            "(cifar-10-batches-py/) under prepare_cifar.download_root") from err
    return (np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)),
            np.asarray(ds.targets, dtype=np.int64))


def load_cifar10(*, download_root: str | Path, local_copy: str | Path = "") -> dict[str, Any]:
    """CIFAR-10 train and test sets from a JPEG copy (``local_copy``, when that path exists) or
    torchvision (``local_copy=""``, or as a fallback when the path does not exist; a note goes
    to stderr).

    Returns:
        dict with ``train_images`` (50000, 3, 32, 32) uint8, ``train_labels`` (50000,) int64,
        ``test_images``, ``test_labels`` likewise (10,000), and ``source``: a label to carry
        into results (:data:`TORCHVISION_SOURCE` or "JPEG copy (<path>)").

    Raises:
        FileNotFoundError / ValueError: see :func:`read_jpeg_copy` (an existing but incomplete
        copy). RuntimeError: torchvision could not download (offline: set
        prepare_cifar.local_copy or fill prepare_cifar.download_root; the message names both).
    """
    if local_copy and Path(local_copy).exists():
        train = read_jpeg_copy(local_copy, "train")
        test = read_jpeg_copy(local_copy, "test")
        source = f"JPEG copy ({local_copy})"
    else:
        if local_copy:
            print(f"prepare_cifar.local_copy {local_copy} does not exist: falling back to "
                  f"torchvision's CIFAR-10 in prepare_cifar.download_root {download_root}",
                  file=sys.stderr)
        train = _torchvision_split(download_root, True, local_copy)
        test = _torchvision_split(download_root, False, local_copy)
        source = TORCHVISION_SOURCE
    return {"train_images": train[0], "train_labels": train[1], "test_images": test[0],
            "test_labels": test[1], "source": source}


def split_indices(n_train: int, n_clean: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n_train)`` into ``n_clean`` clean and ``n_train - n_clean`` poison
    indices (each sorted; int64): the first ``n_clean`` of ``default_rng(seed).permutation``.
    Raises ValueError unless 0 < n_clean < n_train (params.yaml prepare_cifar.n_clean)."""
    if not 0 < n_clean < n_train:
        raise ValueError(f"n_clean must be in (0, {n_train}), got {n_clean} "
                         "(params.yaml prepare_cifar.n_clean)")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[:n_clean]), np.sort(perm[n_clean:])


def prepare_stage(*, dataset_path: str, download_root: str, local_copy: str, seed: int,
                  n_clean: int, n_eval: int) -> dict[str, Any]:
    """Run the ``prepare_cifar`` stage: load CIFAR-10, split the training set, choose the
    evaluation images, and write one NPZ (images, labels, ``clean_idx``, ``poison_idx``,
    ``eval_idx`` into the test set, ``source``).

    The evaluation images are the first ``n_eval`` test images (torchvision, also as the
    fallback for an absent ``local_copy``), or the first ``n_eval`` of
    ``default_rng(seed).permutation`` of the class-sorted JPEG copy's test set.

    Returns:
        a summary dict (source, split sizes, label counts of the evaluation images).

    Raises:
        ValueError: n_eval outside [1, test-set size] (params.yaml prepare_cifar.n_eval), or a
        bad n_clean (:func:`split_indices`).
    """
    data = load_cifar10(download_root=download_root, local_copy=local_copy)
    n_test = len(data["test_labels"])
    if not 0 < n_eval <= n_test:
        raise ValueError(f"n_eval must be in [1, {n_test}], got {n_eval} "
                         "(params.yaml prepare_cifar.n_eval)")
    clean_idx, poison_idx = split_indices(len(data["train_labels"]), n_clean, seed)
    # the JPEG copy's test set is class-sorted: a seeded permutation stands in for the original order
    if data["source"] != TORCHVISION_SOURCE:
        eval_idx = np.random.default_rng(seed).permutation(n_test)[:n_eval]
    else:
        eval_idx = np.arange(n_eval)
    save_npz_atomic(dataset_path, clean_idx=clean_idx, poison_idx=poison_idx,
                    eval_idx=eval_idx.astype(np.int64), source=np.array(data["source"]),
                    **{k: v for k, v in data.items() if k != "source"})
    return {"source": data["source"], "n_train": len(data["train_labels"]), "n_test": n_test,
            "n_clean": len(clean_idx), "n_poison": len(poison_idx), "n_eval": n_eval,
            "eval_label_counts": np.bincount(data["test_labels"][eval_idx], minlength=10).tolist()}


def load_prepared(dataset_path: str | Path) -> dict[str, Any]:
    """Read :func:`prepare_stage`'s NPZ into a dict of arrays (images uint8 (n, 3, 32, 32),
    labels and indices int64, ``source`` as str)."""
    with np.load(dataset_path) as z:
        out = {k: z[k] for k in z.files}
    out["source"] = str(out["source"])
    return out
