"""The version of the code that computes a sample: a hash of this package's source files.

Resume files (the estimator's ``checkpoint_path``, the stages' progress files) carry it, so
samples computed by other code are never loaded back as if this code had computed them.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["source_hash"]

_PACKAGE = Path(__file__).resolve().parent


def source_hash(package_dir: str | Path | None = None) -> str:
    """SHA-256 (hex) of every ``*.py`` file under ``package_dir`` (default: this package).

    Each file contributes its path relative to the package and its bytes, in sorted path
    order, so an edit, a new or a removed module all change the hash; ``__pycache__`` and other
    non-source files do not. Computed once per process for the installed package.
    """
    if package_dir is None:
        return _installed_hash()
    return _hash_tree(Path(package_dir))


@functools.lru_cache(maxsize=1)
def _installed_hash() -> str:
    return _hash_tree(_PACKAGE)


def _hash_tree(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
