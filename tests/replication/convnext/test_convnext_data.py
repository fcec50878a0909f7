"""CIFAR-10 loading (replication.convnext.data) on a few JPEGs the tests write, offline: the
local-copy reader (archive and folder), the seeded clean/poison split, the prepare stage's NPZ."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from replication.convnext import data as cifar


def write_jpeg_tree(root, split, per_class, seed=0, classes=cifar.CLASSES, archive=False):
    """Write per_class random 32x32 JPEGs per class as {split}/<class>/NNNN.jpg (or a .tar.gz).
    Returns the written images (n, 32, 32, 3) uint8 in class, file order, and labels."""
    rng = np.random.default_rng(seed)
    images, labels, files = [], [], []
    for c, name in enumerate(classes):
        for j in range(per_class):
            # smooth images: JPEG keeps them close, so decoded pixels can be checked
            base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
            img = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            files.append((f"{split}/{name}/{j:04d}.jpg", buf.getvalue()))
            images.append(img)
            labels.append(c)
    if archive:
        with tarfile.open(root / f"{split}.tar.gz", "w:gz") as tar:
            for name, data in reversed(files):  # archive order must not matter
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        for name, data in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("archive", [False, True])
def test_jpeg_copy_reader_gives_class_ordered_uint8_images(tmp_path, archive):
    images, labels = write_jpeg_tree(tmp_path, "test", per_class=3, archive=archive)
    got, got_labels = cifar.read_jpeg_copy(tmp_path, "test")
    assert got.dtype == np.uint8 and got.shape == (30, 3, 32, 32)
    np.testing.assert_array_equal(got_labels, labels)
    # the right image in the right place, up to JPEG loss (chroma subsampling of the colour
    # blocks): each decoded image is nearest to its own original
    flat_got = got.transpose(0, 2, 3, 1).reshape(30, -1).astype(float)
    flat_want = images.reshape(30, -1).astype(float)
    dist = np.abs(flat_got[:, None] - flat_want[None]).mean(-1)  # (decoded, original)
    np.testing.assert_array_equal(dist.argmin(1), np.arange(30))
    assert dist.diagonal().max() < 15 < np.median(dist)


def test_jpeg_copy_file_order_is_numeric_within_a_class(tmp_path):
    write_jpeg_tree(tmp_path, "train", per_class=12)
    folder = tmp_path / "train" / "airplane"
    for j in range(12):  # unpadded names: lexical order would put 10.jpg before 2.jpg
        (folder / f"{j:04d}.jpg").rename(folder / f"{j}.jpg")
    a, _ = cifar.read_jpeg_copy(tmp_path, "train")
    for j in (2, 10):
        direct = np.asarray(Image.open(folder / f"{j}.jpg").convert("RGB"))
        np.testing.assert_array_equal(a[j].transpose(1, 2, 0), direct)


def test_jpeg_copy_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.tar.gz.*prepare_cifar.local_copy"):
        cifar.read_jpeg_copy(tmp_path, "test")
    write_jpeg_tree(tmp_path, "test", per_class=1, classes=("airplane", "zebra"))
    with pytest.raises(ValueError, match="'zebra'"):
        cifar.read_jpeg_copy(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        cifar.read_jpeg_copy(tmp_path, "val")


def test_split_is_seeded_disjoint_and_complete():
    clean, poison = cifar.split_indices(50, 30, seed=42)
    assert len(clean) == 30 and len(poison) == 20
    assert set(clean) | set(poison) == set(range(50)) and not set(clean) & set(poison)
    again = cifar.split_indices(50, 30, seed=42)
    np.testing.assert_array_equal(clean, again[0])
    assert not np.array_equal(clean, cifar.split_indices(50, 30, seed=0)[0])
    for bad in (0, 50, 60):
        with pytest.raises(ValueError, match=r"n_clean .*prepare_cifar\.n_clean"):
            cifar.split_indices(50, bad, seed=0)


def test_prepare_stage_writes_split_and_evaluation_images_labelled_jpeg_copy(tmp_path):
    write_jpeg_tree(tmp_path, "train", per_class=4, seed=1, archive=True)
    write_jpeg_tree(tmp_path, "test", per_class=2, seed=2, archive=True)
    out = tmp_path / "dataset.npz"
    summary = cifar.prepare_stage(dataset_path=str(out), download_root=str(tmp_path / "dl"),
                                  local_copy=str(tmp_path), seed=42, n_clean=24, n_eval=8)
    assert summary["source"].startswith("JPEG copy")
    assert (summary["n_clean"], summary["n_poison"], summary["n_eval"]) == (24, 16, 8)
    d = cifar.load_prepared(out)
    assert d["source"].startswith("JPEG copy")
    assert d["train_images"].shape == (40, 3, 32, 32) and d["test_images"].shape == (20, 3, 32, 32)
    assert sorted(np.concatenate([d["clean_idx"], d["poison_idx"]])) == list(range(40))
    # the JPEG copy's test set is class-sorted: evaluation images come from a permutation,
    # so they are not all of the first class
    assert len(set(d["eval_idx"])) == 8 and len(set(d["test_labels"][d["eval_idx"]])) > 1
    with pytest.raises(ValueError, match=r"n_eval .*prepare_cifar\.n_eval"):
        cifar.prepare_stage(dataset_path=str(out), download_root="", local_copy=str(tmp_path),
                            seed=42, n_clean=24, n_eval=21)


def test_torchvision_source_is_used_without_a_local_copy(tmp_path, monkeypatch):
    """local_copy "" goes through torchvision.datasets.CIFAR10(download=True) (stubbed: no
    internet here), converting HWC uint8 to CHW."""
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            n = 6 if train else 4
            self.data = np.arange(n * 32 * 32 * 3, dtype=np.uint8).reshape(n, 32, 32, 3)
            self.targets = list(range(n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    d = cifar.load_cifar10(download_root=tmp_path, local_copy="")
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert d["source"] == "torchvision CIFAR-10"
    assert d["train_images"].shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(d["train_images"][1, :, 2, 5], FakeCIFAR10(0, True, 0).data[1, 2, 5])


def fake_torchvision(monkeypatch, fail=False):
    """Replace torchvision.datasets.CIFAR10 (no internet here); returns its calls."""
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if fail:
                raise RuntimeError("Name or service not known (test)")
            n = 6 if train else 4
            self.data = np.full((n, 32, 32, 3), 7, dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    return calls


def test_absent_local_copy_falls_back_to_torchvision_and_records_it(tmp_path, monkeypatch, capsys):
    calls = fake_torchvision(monkeypatch)
    out = tmp_path / "dataset.npz"
    summary = cifar.prepare_stage(dataset_path=str(out), download_root=str(tmp_path / "dl"),
                                  local_copy=str(tmp_path / "no-such-copy"), seed=42, n_clean=4,
                                  n_eval=3)
    assert calls == [(str(tmp_path / "dl"), True, True), (str(tmp_path / "dl"), False, True)]
    assert summary["source"] == cifar.TORCHVISION_SOURCE == cifar.load_prepared(out)["source"]
    # the real test set keeps its order: the first n_eval images, as with local_copy ""
    np.testing.assert_array_equal(cifar.load_prepared(out)["eval_idx"], [0, 1, 2])
    assert "prepare_cifar.local_copy" in capsys.readouterr().err  # the fallback is announced


def test_present_local_copy_never_calls_torchvision(tmp_path, monkeypatch):
    calls = fake_torchvision(monkeypatch)
    write_jpeg_tree(tmp_path, "train", per_class=1)
    write_jpeg_tree(tmp_path, "test", per_class=1)
    d = cifar.load_cifar10(download_root=tmp_path / "dl", local_copy=tmp_path)
    assert calls == [] and d["source"] == f"JPEG copy ({tmp_path})"


def test_absent_local_copy_and_no_download_is_one_error_naming_both_keys(tmp_path, monkeypatch):
    fake_torchvision(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match=r"prepare_cifar\.local_copy .*no-such-copy does not "
                       r"exist.*prepare_cifar\.download_root") as info:
        cifar.load_cifar10(download_root=tmp_path / "dl", local_copy=tmp_path / "no-such-copy")
    assert "Name or service not known" in str(info.value.__cause__)


def test_incomplete_local_copy_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    calls = fake_torchvision(monkeypatch)
    write_jpeg_tree(tmp_path, "train", per_class=1)  # no test split
    with pytest.raises(FileNotFoundError, match="prepare_cifar.local_copy"):
        cifar.load_cifar10(download_root=tmp_path / "dl", local_copy=tmp_path)
    assert calls == []
