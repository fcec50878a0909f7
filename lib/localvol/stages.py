"""Pipeline plumbing shared by the stage notebooks: parameter checking, running a notebook with
papermill, profiles, and atomic result files.

Every stage notebook starts with a ``parameters`` cell of literal, annotated defaults::

    seed: int = 0  # split seed
    cutoff: float = 1e-2  # nats

then, right after papermill's ``injected-parameters`` cell, one call::

    P = check_parameters(globals())

which turns papermill's warnings into errors: an injected name that the ``parameters`` cell does
not declare (a typo) or a value of the wrong type raises :class:`ParameterError`.

:func:`run_notebook` checks the layout before executing anything: exactly one code cell must be
tagged ``parameters`` (without the tag papermill would inject at the top, the notebook's own
defaults would then overwrite every injected value, and the stage would "succeed" on its
defaults), and every injected name must be declared there (:func:`declared_parameters`).

Command line (what ``dvc.yaml`` runs)::

    python -m localvol.stages run STAGE NOTEBOOK EXECUTED [-p NAME VALUE ...]
    python -m localvol.stages apply-profile profiles/tiny.yaml

``run`` reads the keys listed under ``stages.STAGE.params`` in ``dvc.yaml`` from ``params.yaml``
(so each key is listed once, in ``dvc.yaml``, and DVC tracks exactly what the notebook gets),
injects each under its last path component (``train_mlp.lr`` → ``lr``), adds the ``-p`` pairs
(output paths, as strings), and executes the notebook with papermill on kernel ``python3``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import math
import os
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "ParameterError",
    "check_parameters",
    "stage_parameters",
    "declared_parameters",
    "run_notebook",
    "apply_profile",
    "atomic_path",
    "write_json_atomic",
    "save_npz_atomic",
    "timings_path",
    "write_timings",
    "to_jsonable",
]

KERNEL_NAME = "python3"
_UMASK = os.umask(0)
os.umask(_UMASK)

# Names IPython itself puts in a kernel's user namespace (underscore names are skipped anyway).
_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython", "open"})
_PLAIN_DATA = (bool, int, float, str, list, dict, tuple, type(None))


class ParameterError(ValueError):
    """An unknown (probably mistyped) or ill-typed notebook parameter."""


# ---------------------------------------------------------------------------------------------
# Parameter checking
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Return ``value`` checked against annotation ``tp`` (int is accepted, and converted, where
    a float is declared; bool is never an int). Raise ParameterError otherwise."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(name, value, option)
            except ParameterError:
                pass
        raise ParameterError(f"parameter {name!r}: {value!r} matches none of {_type_name(tp)}")
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise ParameterError(f"parameter {name!r}: expected None, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ParameterError(f"parameter {name!r}: expected float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = (" (a YAML 1.1 loader reads '1e-2' as a string: write 1.0e-2 in "
                        "params.yaml)")
            except ValueError:
                pass
        raise ParameterError(
            f"parameter {name!r}: expected float, got {type(value).__name__} {value!r}{hint}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise ParameterError(
            f"parameter {name!r}: expected int, got {type(value).__name__} {value!r}")
    if tp in (bool, str):
        if isinstance(value, tp):
            return value
        raise ParameterError(
            f"parameter {name!r}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParameterError(
                f"parameter {name!r}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ParameterError(
                    f"parameter {name!r}: expected {len(args)} items, got {len(value)}")
            return [_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args))]
        item = args[0] if args else Any
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ParameterError(
                f"parameter {name!r}: expected a mapping, got {type(value).__name__} {value!r}")
        ktp, vtp = args if args else (Any, Any)
        return {_coerce(f"{name} key", k, ktp): _coerce(f"{name}[{k!r}]", v, vtp)
                for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ParameterError(
            f"parameter {name!r}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    raise ParameterError(f"parameter {name!r}: unsupported annotation {tp!r}")


def check_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """Validate a notebook's parameters after papermill injected its overrides.

    ``namespace`` is the notebook's ``globals()``. The declared parameters are the annotated
    top-level names of the ``parameters`` cell (``namespace['__annotations__']``); papermill's
    injected cell assigns without annotations. Every other top-level name holding plain data
    (bool, int, float, str, list, dict, tuple, None) and not starting with ``_`` must therefore
    be a mistyped or unknown injected parameter: that is an error, as is a value whose type does
    not match its annotation. ints are converted to float where a float is declared, and the
    converted values are written back into ``namespace``.

    Returns the parameters as a dict (declaration order), ready to be passed as keyword
    arguments to a ``lib`` function.
    """
    declared = dict(namespace.get("__annotations__", {}))
    if not declared:
        raise ParameterError(
            "no annotated parameters found: the notebook's `parameters` cell must declare each "
            "parameter as `name: type = default`")
    unknown = sorted(
        name for name, value in namespace.items()
        if name not in declared and not name.startswith("_") and name not in _IPYTHON_NAMES
        and isinstance(value, _PLAIN_DATA)
    )
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, declared, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(
            f"unknown parameter(s) {', '.join(hints)}; this notebook declares: "
            f"{', '.join(declared)}")
    checked = {}
    for name, tp in declared.items():
        if name not in namespace:
            raise ParameterError(f"parameter {name!r} is annotated but has no value")
        checked[name] = _coerce(name, namespace[name], tp)
        namespace[name] = checked[name]
    return checked


# ---------------------------------------------------------------------------------------------
# params.yaml / dvc.yaml
# ---------------------------------------------------------------------------------------------


def _load_yaml(path: str | Path) -> Any:
    """Read YAML 1.2 (ruamel, as DVC does: ``1e-2`` is a float) into plain Python objects."""
    from ruamel.yaml import YAML

    with open(path) as f:
        data = YAML(typ="safe", pure=True).load(f)
    return json.loads(json.dumps(data))  # plain dict/list/float/int/str/None


def _get_path(params: dict, dotted: str) -> Any:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{dotted!r} not found in params")
        node = node[part]
    return node


def stage_parameters(stage: str, dvc_yaml: str | Path = "dvc.yaml",
                     params_yaml: str | Path = "params.yaml") -> dict[str, Any]:
    """The parameters DVC tracks for ``stage``, keyed by their last path component.

    ``stages.<stage>.params`` in ``dvc.yaml`` lists dotted keys of ``params.yaml`` (or mappings
    ``{file: [keys]}`` for other files, paths relative to ``dvc.yaml``). Two keys with the same
    last component are an error.
    """
    dvc_yaml = Path(dvc_yaml)
    stages = _load_yaml(dvc_yaml).get("stages", {})
    if stage not in stages:
        raise KeyError(f"stage {stage!r} not in {dvc_yaml}; stages: {', '.join(stages)}")
    entries = stages[stage].get("params", [])
    sources: dict[Path, list[str]] = {}
    for entry in entries:
        if isinstance(entry, str):
            sources.setdefault(Path(params_yaml), []).append(entry)
        else:
            for file, keys in entry.items():
                sources.setdefault(dvc_yaml.parent / file, []).extend(keys)
    out: dict[str, Any] = {}
    for file, keys in sources.items():
        params = _load_yaml(file)
        for key in keys:
            leaf = key.rsplit(".", 1)[-1]
            if leaf in out:
                raise ValueError(f"stage {stage!r}: two parameters named {leaf!r}")
            out[leaf] = _get_path(params, key)
    return out


PARAMETERS_TAG = "parameters"
_TAG_HOWTO = (
    "tag the cell of literal defaults `parameters`: in JupyterLab select it and add the tag in "
    "the property inspector (gear icon, right sidebar), or put \"tags\": [\"parameters\"] in "
    "the cell's metadata")


def _cell_tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []) or [])


def _assigned_names(target: ast.expr) -> Iterator[str]:
    """The names bound by an assignment target (``a``, ``a, b``, ``[a, *b]``)."""
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _assigned_names(element)
    elif isinstance(target, ast.Starred):
        yield from _assigned_names(target.value)


def _parse_cell(source: str, where: str) -> ast.Module:
    """``ast.parse`` a code cell; IPython syntax (``%magic``, ``!cmd``) is translated first."""
    try:
        return ast.parse(source)
    except SyntaxError:
        pass
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return ast.parse(TransformerManager().transform_cell(source))
    except (ImportError, SyntaxError) as err:
        raise ParameterError(f"{where} is not valid Python: {err}") from err


def declared_parameters(notebook: str | Path) -> list[str]:
    """The parameter names that a stage notebook's ``parameters`` cell declares, in order.

    ``notebook`` is the path of an ``.ipynb`` file, read with nbformat (nothing is executed). It
    must have exactly one cell tagged ``parameters``, and that cell must be a code cell: papermill
    injects its cell right after it, so the injected values override the defaults. Its source is
    parsed with :mod:`ast`; the declared names are the targets of its top-level assignments:
    ``name: type = default`` (the project's convention, and what :func:`check_parameters` sees)
    and also plain ``name = default``. Assignments nested in ``if``/``for``/functions are not
    declarations.

    Returns the names in declaration order, each once. Raises :class:`ParameterError` naming the
    notebook when no cell or several cells are tagged ``parameters`` (with how many, and how to
    tag the cell), when the tagged cell is not a code cell, when a cell tagged
    ``injected-parameters`` (left by an earlier papermill run) comes before it (the defaults would
    overwrite the injected values), or when its source is not valid Python.
    """
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    tagged = [i for i, cell in enumerate(nb.cells) if PARAMETERS_TAG in _cell_tags(cell)]
    if not tagged:
        raise ParameterError(
            f"{notebook}: found 0 cells tagged {PARAMETERS_TAG!r}, need exactly one code cell: "
            f"papermill would inject the parameters at the top and the notebook's own defaults "
            f"would overwrite them. To fix, {_TAG_HOWTO}")
    if len(tagged) > 1:
        raise ParameterError(
            f"{notebook}: found {len(tagged)} cells tagged {PARAMETERS_TAG!r} (cells "
            f"{', '.join(str(i) for i in tagged)}), need exactly one code cell: papermill "
            f"injects after the first, and the later ones would overwrite the injected values. "
            f"Keep the tag on the cell of literal defaults only (JupyterLab's property "
            f"inspector, or the cells' metadata \"tags\")")
    index = tagged[0]
    cell = nb.cells[index]
    if cell.cell_type != "code":
        raise ParameterError(
            f"{notebook}: cell {index} is tagged {PARAMETERS_TAG!r} but is a {cell.cell_type} "
            f"cell; {_TAG_HOWTO} (a code cell)")
    injected = [i for i, c in enumerate(nb.cells) if "injected-parameters" in _cell_tags(c)]
    if injected and injected[0] < index:
        raise ParameterError(
            f"{notebook}: cell {injected[0]} tagged 'injected-parameters' comes before the "
            f"{PARAMETERS_TAG!r} cell {index}, so the defaults would overwrite the injected "
            f"values; delete it (run stages from the committed notebook, not an executed copy)")
    tree = _parse_cell(cell.source, f"{notebook}: the {PARAMETERS_TAG!r} cell (cell {index})")
    names: dict[str, None] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            names.update(dict.fromkeys(_assigned_names(node.target)))
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(dict.fromkeys(_assigned_names(target)))
    return list(names)


def _check_injected(notebook: str | Path, parameters: dict[str, Any]) -> None:
    """Raise ParameterError unless every name of ``parameters`` is declared by ``notebook``."""
    declared = declared_parameters(notebook)
    undeclared = [name for name in parameters if name not in declared]
    if undeclared:
        hints = []
        for name in undeclared:
            close = difflib.get_close_matches(name, declared, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(
            f"{notebook}: injected parameter(s) {', '.join(hints)} not declared by its "
            f"{PARAMETERS_TAG!r} cell, which declares: {', '.join(declared) or '(nothing)'}. "
            f"Declare each as `name: type = default` there, or stop passing it (dvc.yaml's "
            f"params / -p)")


def run_notebook(notebook: str | Path, executed: str | Path, parameters: dict[str, Any],
                 *, kernel_name: str = KERNEL_NAME, stream: bool = True) -> None:
    """Execute ``notebook`` with papermill into ``executed`` (cwd = the current directory).

    Before anything runs or is written, the notebook must have exactly one code cell tagged
    ``parameters`` and declare there every name of ``parameters`` (:func:`declared_parameters`);
    otherwise :class:`ParameterError` is raised and ``executed`` is not created.

    With ``stream``, the notebook's stdout/stderr (progress bars included) are copied to this
    process's as they arrive. A failing cell raises ``papermill.PapermillExecutionError``."""
    _check_injected(notebook, parameters)
    import papermill

    Path(executed).parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(notebook), str(executed), parameters=parameters, kernel_name=kernel_name,
        cwd=os.getcwd(), progress_bar=False,
        stdout_file=sys.stdout if stream else None, stderr_file=sys.stderr if stream else None,
    )


def apply_profile(profile: str | Path, params_yaml: str | Path = "params.yaml") -> list[str]:
    """Overwrite values of ``params_yaml`` with those of a profile file (same nesting), keeping
    comments. A profile key that ``params_yaml`` lacks is an error (a typo would otherwise be
    silently ignored). Returns the changed dotted keys."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip
    yaml.preserve_quotes = True
    yaml.width = 100
    with open(params_yaml) as f:
        params = yaml.load(f)
    overrides = _load_yaml(profile) or {}
    changed: list[str] = []

    def merge(node, update, prefix):
        for key, value in update.items():
            dotted = f"{prefix}{key}"
            if key not in node:
                raise KeyError(f"profile {profile}: {dotted!r} is not a key of {params_yaml}")
            if isinstance(value, dict) and isinstance(node[key], dict) and node[key]:
                merge(node[key], value, dotted + ".")  # (an empty mapping is replaced whole)
            else:
                node[key] = value
                changed.append(dotted)

    merge(params, overrides, "")
    with atomic_path(params_yaml) as tmp, open(tmp, "w") as f:
        yaml.dump(params, f)
    return changed


# ---------------------------------------------------------------------------------------------
# Atomic result files
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m localvol.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a stage notebook with its dvc.yaml parameters")
    run.add_argument("stage")
    run.add_argument("notebook", type=Path)
    run.add_argument("executed", type=Path)
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                     metavar=("NAME", "VALUE"), help="extra string parameter (e.g. a path)")
    run.add_argument("--dvc-yaml", default="dvc.yaml")
    run.add_argument("--params", default="params.yaml")
    prof = sub.add_parser("apply-profile", help="overwrite params.yaml values with a profile's")
    prof.add_argument("profile", type=Path)
    prof.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    if args.command == "run":
        parameters = stage_parameters(args.stage, args.dvc_yaml, args.params)
        for name, value in args.parameter:
            if name in parameters:
                raise SystemExit(f"-p {name}: already a params.yaml parameter of {args.stage}")
            parameters[name] = value
        print(f"[{args.stage}] {args.notebook} -> {args.executed}", file=sys.stderr)
        for name, value in parameters.items():
            print(f"[{args.stage}]   {name} = {value!r}", file=sys.stderr)
        run_notebook(args.notebook, args.executed, parameters)
    elif args.command == "apply-profile":
        for key in apply_profile(args.profile, args.params):
            print(f"set {key}")


if __name__ == "__main__":
    main()
