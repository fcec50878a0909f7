"""Fingerprints of the external inputs (stage record_inputs)."""

import hashlib
import json

import pytest

from replication.inputs import describe_input, fingerprint, record_inputs


def test_fingerprint_of_a_file_is_its_sha256(tmp_path):
    f = tmp_path / "tok.json"
    f.write_bytes(b'{"a": 1}')
    assert fingerprint(f) == hashlib.sha256(b'{"a": 1}').hexdigest()


def test_folder_fingerprint_changes_with_any_byte_or_name_and_not_with_mtime(tmp_path):
    d = tmp_path / "copy"
    (d / "train").mkdir(parents=True)
    (d / "train" / "a.jpg").write_bytes(b"abc")
    (d / "test.tar.gz").write_bytes(b"xyz")
    before = fingerprint(d)
    (d / "train" / "a.jpg").touch()
    assert fingerprint(d) == before
    (d / "train" / "a.jpg").write_bytes(b"abd")
    assert fingerprint(d) != before
    (d / "train" / "a.jpg").write_bytes(b"abc")
    (d / "train" / "a.jpg").rename(d / "train" / "b.jpg")
    assert fingerprint(d) != before
    with pytest.raises(FileNotFoundError):
        fingerprint(tmp_path / "missing")


def test_absent_copies_name_the_real_loader_and_present_ones_their_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are from the working directory, as in stages
    (tmp_path / "tok.json").write_text("{}")
    params = {"prepare_cifar": {"local_copy": "nowhere/cifar"},
              "fetch_pythia": {"tokenizer_path": "tok.json"},
              "pythia_estimate": {"eval_source": "local"}}
    records = record_inputs(tmp_path / "inputs", _write(tmp_path, params))
    assert records["cifar10"]["source"].startswith("torchvision.datasets.CIFAR10 download")
    assert records["cifar10"]["sha256"] is None
    assert records["tokenizer"] == {"key": "fetch_pythia.tokenizer_path", "value": "tok.json",
                                    "source": "local copy",
                                    "sha256": hashlib.sha256(b"{}").hexdigest()}
    assert "pydoc_data" in records["eval_text"]["source"]
    assert json.loads((tmp_path / "inputs" / "tokenizer.json").read_text()) == records["tokenizer"]


def test_a_missing_key_is_named():
    with pytest.raises(KeyError, match="prepare_cifar.local_copy"):
        describe_input("cifar10", {"prepare_cifar": {}})


def _write(tmp_path, params):
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(params))  # JSON is YAML
    return path
