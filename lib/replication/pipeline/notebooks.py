"""Running a stage notebook with papermill, after checking its ``parameters`` cell.

:func:`run_notebook` checks the layout before executing anything: exactly one code cell must be
tagged ``parameters`` (without the tag papermill would inject at the top, the notebook's own
defaults would then overwrite every injected value, and the stage would "succeed" on its
defaults), and every injected name must be declared there (:func:`declared_parameters`).
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from replication.pipeline.parameters import ParameterError, with_hints

__all__ = ["KERNEL_NAME", "declared_parameters", "run_notebook"]

KERNEL_NAME = "python3"

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
        raise ParameterError(
            f"{notebook}: injected parameter(s) {with_hints(undeclared, declared)} not declared by its "
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

