"""Result files written atomically (a crashed stage never leaves a half-written result), and
the wall-time files that stay outside DVC."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["atomic_path", "to_jsonable", "write_json_atomic", "read_json", "save_npz_atomic",
           "write_csv_atomic", "timings_path", "write_timings"]

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` (atomic on
    POSIX), on error remove it. A crashed stage never leaves a half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give results the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays → Python; non-finite floats → None (strict JSON, as DVC reads it)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def timings_path(result_path: str | Path) -> Path:
    """The file beside a result that holds its wall times: ``results/x/estimates.json`` →
    ``results/x/estimates.timings.json``. It is NOT a DVC out and no stage reads it: DVC-tracked
    results stay a pure function of inputs, params and code, so an identical rerun leaves
    ``dvc.lock`` unchanged."""
    p = Path(result_path)
    return p.with_name(p.name.split(".")[0] + ".timings.json")


def write_timings(result_path: str | Path, timings: dict[str, Any]) -> Path:
    """Write ``timings`` (seconds) atomically to :func:`timings_path` of ``result_path``."""
    return write_json_atomic(timings_path(result_path), timings)


def save_npz_atomic(path: str | Path, **arrays: Any) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def write_csv_atomic(path: str | Path, rows: list[dict[str, Any]],
                     columns: list[str] | None = None) -> Path:
    """Write ``rows`` (one dict per row; ``columns`` fixes their order, missing values are
    left empty) as a CSV with a header, floats at 8 significant digits, atomically."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False, float_format="%.8g")
    return Path(path)


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path``."""
    return json.loads(Path(path).read_text())
