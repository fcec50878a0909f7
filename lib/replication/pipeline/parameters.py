"""Notebook parameters: the check that runs inside every stage notebook, and the values
``dvc.yaml`` hands each stage.

Every stage notebook starts with a ``parameters`` cell of literal, annotated defaults::

    seed: int = 0  # split seed
    cutoff: float = 1e-2  # nats

then, right after papermill's ``injected-parameters`` cell, one call::

    P = notebook_setup(globals())

which checks the declared parameters (a value of the wrong type raises :class:`ParameterError`;
an injected name the cell does not declare was refused before the run, by
:func:`replication.pipeline.notebooks.run_notebook`) and makes the repository root the working
directory, so that the notebook's relative paths mean the same under ``dvc repro`` and when run
by hand in JupyterLab (whose kernels start in ``notebooks/``), however often it is rerun.
:func:`stage_parameters` reads the keys ``dvc.yaml`` lists for a stage from ``params.yaml``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["ParameterError", "check_parameters", "notebook_setup", "repository_root",
           "stage_parameters", "stage_parameter_keys", "stage_paths", "check_values", "load_yaml"]

# The file that marks the repository root (the folder DVC runs the stages in).
ROOT_MARKER = "dvc.yaml"


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


def with_hints(names, known) -> str:
    """``'lr', 'sed' (did you mean 'seed'?)``: each name, with the closest known one if any."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, list(known), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)


def check_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """Check a notebook's declared parameters after papermill injected its overrides.

    ``namespace`` is the notebook's ``globals()``. The declared parameters are the annotated
    top-level names of the ``parameters`` cell (``namespace['__annotations__']``; papermill's
    injected cell assigns without annotations). Only they are checked: each must have a value
    whose type matches its annotation (ints are converted to float where a float is declared,
    and the converted value is written back into ``namespace``). Other names, such as the
    notebook's own ``P`` or results of an earlier Run All, are left alone; names injected
    without being declared are refused before the run (``run_notebook``).

    Returns the parameters as a dict (declaration order), ready to be passed as keyword
    arguments to a ``lib`` function. Raises :class:`ParameterError` naming the parameter, the
    expected type and the value.
    """
    declared = dict(namespace.get("__annotations__", {}))
    if not declared:
        raise ParameterError(
            "no annotated parameters found: the notebook's `parameters` cell must declare each "
            "parameter as `name: type = default`")
    checked = {}
    for name, tp in declared.items():
        if name not in namespace:
            raise ParameterError(f"parameter {name!r} is annotated but has no value")
        checked[name] = _coerce(name, namespace[name], tp)
        namespace[name] = checked[name]
    return checked


def repository_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory, which is the
    notebook's folder in a JupyterLab kernel) that holds ``dvc.yaml``. Raises FileNotFoundError
    naming ``start`` when there is none."""
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ROOT_MARKER).is_file():
            return folder
    raise FileNotFoundError(
        f"no {ROOT_MARKER} in {here} or any folder above it: open the stage notebooks from the "
        f"repository's notebooks/ folder (make lab), or run them from inside the repository")


_DECLARED = "_declared_parameters"  # the names of the last checked parameters cell


def notebook_setup(namespace: dict[str, Any]) -> dict[str, Any]:
    """The second cell of every stage notebook: :func:`check_parameters` on ``namespace`` (the
    notebook's ``globals()``), then make :func:`repository_root` the working directory, so that
    the relative paths of the ``parameters`` cell (relative to the repository root, as in
    ``dvc.yaml``) resolve the same under ``dvc repro`` (already at the root) and in JupyterLab
    (started in ``notebooks/``).

    Idempotent: Run All twice in one kernel gives the same result, and an edited parameters
    cell counts as edited. IPython never empties a kernel's ``__annotations__``, so a parameter
    renamed or deleted between two runs would otherwise still be passed; the declared names are
    therefore moved out of ``__annotations__`` into ``namespace["_declared_parameters"]`` once
    checked (rerunning this cell alone reuses them). Returns the checked parameters."""
    annotations = namespace.setdefault("__annotations__", {})
    if not annotations and namespace.get(_DECLARED):
        annotations.update(namespace[_DECLARED])  # this cell rerun without the parameters cell
    parameters = check_parameters(namespace)
    namespace[_DECLARED] = dict(annotations)
    annotations.clear()
    root = repository_root()
    if Path.cwd().resolve() != root:
        os.chdir(root)
    return parameters


def load_yaml(path: str | Path) -> Any:
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


def _stage_sources(stage: str, dvc_yaml: str | Path,
                   params_yaml: str | Path) -> dict[Path, list[str]]:
    """{params file: [dotted keys]} that ``dvc.yaml`` lists for ``stage``."""
    dvc_yaml = Path(dvc_yaml)
    stages = load_yaml(dvc_yaml).get("stages", {})
    if stage not in stages:
        raise KeyError(f"stage {stage!r} not in {dvc_yaml}; stages: {', '.join(stages)}")
    sources: dict[Path, list[str]] = {}
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            sources.setdefault(Path(params_yaml), []).append(entry)
        else:
            for file, keys in entry.items():
                sources.setdefault(dvc_yaml.parent / file, []).extend(keys)
    return sources


def stage_parameter_keys(stage: str, dvc_yaml: str | Path = "dvc.yaml",
                         params_yaml: str | Path = "params.yaml") -> dict[str, str]:
    """``{notebook name: params key}`` for ``stage``, e.g. ``{"cutoff":
    "estimate_figure1.cutoff"}`` (keys of another file than ``params_yaml`` are written
    ``file:key``), so that messages can name the key a user edits. Two keys with the same last
    component are an error (ValueError)."""
    keys: dict[str, str] = {}
    for file, dotted in _stage_sources(stage, dvc_yaml, params_yaml).items():
        for key in dotted:
            leaf = key.rsplit(".", 1)[-1]
            if leaf in keys:
                raise ValueError(f"stage {stage!r}: two parameters named {leaf!r}")
            keys[leaf] = key if file == Path(params_yaml) else f"{file}:{key}"
    return keys


def stage_parameters(stage: str, dvc_yaml: str | Path = "dvc.yaml",
                     params_yaml: str | Path = "params.yaml") -> dict[str, Any]:
    """The parameters DVC tracks for ``stage``, keyed by their last path component.

    ``stages.<stage>.params`` in ``dvc.yaml`` lists dotted keys of ``params.yaml`` (or mappings
    ``{file: [keys]}`` for other files, paths relative to ``dvc.yaml``). Two keys with the same
    last component are an error.
    """
    out: dict[str, Any] = {}
    for file, keys in _stage_sources(stage, dvc_yaml, params_yaml).items():
        params = load_yaml(file)
        for key in keys:
            leaf = key.rsplit(".", 1)[-1]
            if leaf in out:
                raise ValueError(f"stage {stage!r}: two parameters named {leaf!r}")
            out[leaf] = _get_path(params, key)
    return out


def stage_paths(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> dict[str, str]:
    """The ``-p NAME PATH`` pairs of ``stage``'s command in ``dvc.yaml``, with ``${paths.x}``
    resolved from its ``vars``: the input and output paths the pipeline passes (tests use them
    to run a notebook the way ``dvc repro`` does)."""
    import re
    import shlex

    spec = load_yaml(dvc_yaml)
    paths: dict[str, str] = {}
    for entry in spec.get("vars", []):
        if isinstance(entry, dict):
            paths.update(entry.get("paths", {}))
    cmd = re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)],
                 spec["stages"][stage]["cmd"])
    words = shlex.split(cmd)
    return {words[i + 1]: words[i + 2] for i, w in enumerate(words) if w == "-p"}


_ANNOTATION_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "list": list,
                     "dict": dict, "tuple": tuple, "None": None, "Any": Any}


def check_values(parameters: dict[str, Any], annotations: dict[str, str],
                 keys: dict[str, str]) -> None:
    """Check, before a stage runs, each value of ``parameters`` against the annotation its
    notebook declares (``annotations``: name → annotation source, e.g. ``"list[float]"``), the
    same way :func:`check_parameters` will inside the notebook, but naming the key to edit
    (``keys``: name → ``params.yaml`` key; names without one are reported as ``-p NAME``).
    Raises :class:`ParameterError` listing every ill-typed value."""
    problems = []
    for name, value in parameters.items():
        if name not in annotations:
            if name in keys:  # a params.yaml key the notebook no longer declares (renamed?)
                problems.append(
                    f"params.yaml {keys[name]} is passed to the notebook as {name!r}, which "
                    f"its parameters cell does not declare ({', '.join(annotations)}): "
                    f"rename the key in params.yaml and in dvc.yaml's params of the stage, "
                    f"or declare `{name}: type = default` in the parameters cell")
            continue  # other undeclared names are refused by run_notebook, with a hint
        tp = eval(annotations[name], {"__builtins__": {}}, _ANNOTATION_NAMES)  # noqa: S307
        where = f"params.yaml {keys[name]}" if name in keys else f"-p {name}"
        try:
            _coerce(where, value, tp)
        except ParameterError as err:
            problems.append(str(err))
    if problems:
        raise ParameterError("; ".join(problems))
