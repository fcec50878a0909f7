"""Reading and running stage notebooks: Jupytext pairs, the ``parameters`` cell, papermill.

Each stage notebook is a Jupytext pair in ``notebooks/``: ``X.ipynb`` (what users open in
JupyterLab; its outputs and metadata change as they work) and ``X.py`` (percent format: the
cells only). ``dvc.yaml`` depends on, and :func:`run_notebook` executes, ``X.py``, so opening,
running or saving the notebook leaves the pipeline up to date while editing a cell reruns the
stage. :func:`read_notebook` refuses a pair whose two files hold different cells (an ``.ipynb``
edited without Jupytext), since the pipeline would run code other than what the user sees.

:func:`run_notebook` checks the layout before executing anything: exactly one code cell must be
tagged ``parameters`` (without the tag papermill would inject at the top, the notebook's own
defaults would then overwrite every injected value, and the stage would "succeed" on its
defaults), and every injected name must be declared there (:func:`declared_parameters`). The
executed copy is written read-only, so viewing it in JupyterLab cannot change it.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from replication.pipeline.parameters import ParameterError, with_hints

__all__ = ["KERNEL_NAME", "NotebookPairError", "read_notebook", "declared_parameters",
           "declared_annotations", "run_notebook"]

KERNEL_NAME = "python3"
KERNELSPEC = {"display_name": "Python 3 (localvol)", "language": "python", "name": KERNEL_NAME}


def _ipc_kernel_manager() -> type:
    """jupyter_client's kernel manager over local sockets (files in Jupyter's runtime folder)
    instead of TCP: ipykernel warns on every start over unencrypted TCP, and nothing here needs
    a network port."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return IPCKernelManager


class NotebookPairError(ValueError):
    """The two files of a Jupytext pair (``X.ipynb``, ``X.py``) hold different cells."""


def _cells(nb: Any) -> list[tuple[str, str, tuple[str, ...]]]:
    """What the pipeline runs of a notebook: each cell's type, source and tags."""
    return [(c.cell_type, c.source.strip(), tuple(sorted(_cell_tags(c)))) for c in nb.cells]


def read_notebook(path: str | Path) -> Any:
    """Read a stage notebook as an ``nbformat`` v4 node, metadata reset to :data:`KERNELSPEC`.

    ``path`` is a percent-format script (``X.py``, read with Jupytext) or an ``.ipynb``. When a
    ``.py`` has its pair ``X.ipynb`` beside it, both must hold the same cells (type, source up to
    surrounding blank lines, tags); otherwise :class:`NotebookPairError` is raised, naming the
    first differing cell and how to bring the pair back in step (Jupytext in JupyterLab saves
    both files; ``jupytext --sync`` takes the newer one).
    """
    import jupytext
    import nbformat

    path = Path(path)
    if path.suffix == ".py":
        nb = jupytext.read(path, fmt="py:percent")
        pair = path.with_suffix(".ipynb")
        if pair.exists():
            a, b = _cells(nb), _cells(nbformat.read(str(pair), as_version=4))
            if a != b:
                first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise NotebookPairError(
                    f"{pair} and {path} hold different cells (first difference: cell {first}; "
                    f"{len(b)} vs {len(a)} cells). dvc repro runs {path}, and Jupytext in "
                    f"JupyterLab refuses to open a pair whose .ipynb is the newer file: run "
                    f"`jupytext --sync {pair}` (it keeps the newer file's cells in both), or "
                    f"`git checkout {pair} {path}` to drop the edit")
    else:
        nb = nbformat.read(str(path), as_version=4)
    nb.metadata = nbformat.NotebookNode(
        kernelspec=nbformat.NotebookNode(KERNELSPEC),
        language_info=nbformat.NotebookNode(name="python"))
    return nb

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


def _parameters_cell(notebook: str | Path) -> tuple[int, Any]:
    """(index, cell) of the one code cell tagged ``parameters`` (rules: :func:`declared_parameters`)."""
    nb = read_notebook(notebook)
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
    return index, cell


def declared_annotations(notebook: str | Path) -> dict[str, str]:
    """``{name: annotation source}`` of the ``name: type = default`` lines of ``notebook``'s
    ``parameters`` cell (names assigned without an annotation are left out). Same errors as
    :func:`declared_parameters`."""
    index, cell = _parameters_cell(notebook)
    tree = _parse_cell(cell.source, f"{notebook}: the {PARAMETERS_TAG!r} cell (cell {index})")
    return {node.target.id: ast.unparse(node.annotation) for node in tree.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def declared_parameters(notebook: str | Path) -> list[str]:
    """The parameter names that a stage notebook's ``parameters`` cell declares, in order.

    ``notebook`` is the path of a stage notebook, read with :func:`read_notebook` (nothing is
    executed). It must have exactly one cell tagged ``parameters``, and that cell must be a code cell: papermill
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
    index, cell = _parameters_cell(notebook)
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
    """Execute ``notebook`` (``X.py`` of a Jupytext pair, or an ``.ipynb``) with papermill into
    ``executed`` (an ``.ipynb``), in the current directory.

    Before anything runs or is written, the notebook must be read by :func:`read_notebook` (a
    pair in step) and have exactly one code cell tagged ``parameters`` declaring every name of
    ``parameters`` (:func:`declared_parameters`); otherwise :class:`NotebookPairError` or
    :class:`ParameterError` is raised and ``executed`` is not created.

    The executed copy is written beside ``executed`` and renamed onto it when the run ends
    (successful or not: a failed run's copy shows the failing cell), read-only (mode 0444), so
    that opening it in JupyterLab cannot autosave over it. With ``stream``, the notebook's
    stdout/stderr (progress bars included) are copied to this process's as they arrive. A
    failing cell raises ``papermill.PapermillExecutionError``."""
    _check_injected(notebook, parameters)
    import papermill

    nb = read_notebook(notebook)
    executed = Path(executed)
    executed.parent.mkdir(parents=True, exist_ok=True)
    partial = executed.with_name(f".{executed.stem}.partial.ipynb")
    try:
        papermill.execute_notebook(
            nb, str(partial), parameters=parameters, kernel_name=kernel_name,
            cwd=os.getcwd(), progress_bar=False, kernel_manager_class=_ipc_kernel_manager(),
            stdout_file=sys.stdout if stream else None, stderr_file=sys.stderr if stream else None,
        )
    finally:
        if partial.exists():
            partial.chmod(0o444)
            os.replace(partial, executed)
