"""Fingerprints of the pipeline's external inputs: the files outside the repository that stages
read, and that can be replaced without any change DVC would see.

Three inputs, each named by a ``params.yaml`` key: the CIFAR-10 copy
(``prepare_cifar.local_copy``), the Pythia tokenizer (``fetch_pythia.tokenizer_path``) and the
evaluation text of the Pythia estimates (``pythia_estimate.eval_source``: ``local``, or a Pile
JSONL). Each may be absent: the loaders then use the real source (torchvision's CIFAR-10
download, the hub's tokenizer) and say so in their results.

DVC cannot depend on a path that may not exist (``dvc repro`` stops on a missing dependency), so
stage ``record_inputs`` (``always_changed``) writes one small JSON per input,
``results/inputs/<name>.json``: which source the stages will use and, for a local file or
folder, the SHA-256 of its bytes. The stages that read an input depend on its JSON; DVC compares
its content, so an unchanged input reruns nothing and a replaced one reruns exactly its readers.

    python -m replication.inputs OUT_DIR [--params params.yaml]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from replication.pipeline.files import write_json_atomic
from replication.pipeline.parameters import load_yaml

__all__ = ["INPUTS", "fingerprint", "describe_input", "record_inputs"]

# name: (params section, key, what is used when the local copy is absent or not named)
INPUTS: dict[str, tuple[str, str, str]] = {
    "cifar10": ("prepare_cifar", "local_copy",
                "torchvision.datasets.CIFAR10 download (into prepare_cifar.download_root)"),
    "tokenizer": ("fetch_pythia", "tokenizer_path",
                  "the hub tokenizer of fetch_pythia.repo_id"),
    "eval_text": ("pythia_estimate", "eval_source",
                  "held-out topics of the standard library's pydoc_data (local source)"),
}
_CHUNK = 1 << 20


def fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, or of a folder: every file below it in sorted relative
    path order, each as its relative path, a NUL, its size, a NUL and its bytes. Raises
    FileNotFoundError if ``path`` does not exist."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [(Path(path.name), path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path), p) for p in path.rglob("*") if p.is_file())
    else:
        raise FileNotFoundError(path)
    for rel, p in files:
        if path.is_dir():
            digest.update(f"{rel.as_posix()}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def describe_input(name: str, params: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """What stage ``record_inputs`` writes for input ``name`` (a key of :data:`INPUTS`) under
    ``params`` (``params.yaml`` loaded): ``{"key", "value", "source", "sha256"}``. ``source`` is
    "local copy" when the named path exists (relative paths against ``root``), with its
    :func:`fingerprint`; otherwise the real loader (``sha256`` None). ``eval_text`` set to
    ``local`` is the local source's held-out text. Raises KeyError naming the missing key."""
    section, key, fallback = INPUTS[name]
    try:
        value = params[section][key]
    except KeyError as err:
        raise KeyError(f"params.yaml has no {section}.{key}") from err
    record = {"key": f"{section}.{key}", "value": value, "source": fallback, "sha256": None}
    if name == "eval_text" and value == "local":
        return record
    path = Path(root) / str(value) if value else None
    if path is not None and path.exists():
        record.update(source="local copy", sha256=fingerprint(path))
    elif name == "eval_text":
        record["source"] = "missing (the estimate stages will stop: see the preflight check)"
    return record


def record_inputs(out_dir: str | Path, params_path: str | Path = "params.yaml") -> dict[str, dict]:
    """Write ``out_dir/<name>.json`` (:func:`describe_input`; relative paths from the working
    directory, the repository root where the stages that read them run) for every input of
    :data:`INPUTS`; returns the records."""
    params = load_yaml(params_path)
    records = {name: describe_input(name, params) for name in INPUTS}
    for name, record in records.items():
        write_json_atomic(Path(out_dir) / f"{name}.json", record)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m replication.inputs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    for name, record in record_inputs(args.out_dir, args.params).items():
        print(f"[record_inputs] {name}: {record['key']} = {record['value']!r} -> {record['source']}"
              + (f" (sha256 {record['sha256'][:12]}…)" if record["sha256"] else ""))


if __name__ == "__main__":
    main()
