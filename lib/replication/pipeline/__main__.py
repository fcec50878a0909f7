"""Command line of the pipeline (what ``dvc.yaml`` and the Makefile run)::

    python -m replication.pipeline run STAGE NOTEBOOK EXECUTED [-p NAME VALUE ...]
    python -m replication.pipeline apply-profile profiles/tiny.yaml
    python -m replication.pipeline preflight [--params params.yaml]

``run`` reads the keys listed under ``stages.STAGE.params`` in ``dvc.yaml`` from ``params.yaml``
(so each key is listed once, in ``dvc.yaml``, and DVC tracks exactly what the notebook gets),
injects each under its last path component (``train_mlp.lr`` → ``lr``), adds the ``-p`` pairs
(output paths, as strings), and executes the notebook with papermill on kernel ``python3``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from replication.pipeline.notebooks import NotebookPairError, declared_annotations, run_notebook
from replication.pipeline.parameters import (
    ParameterError,
    check_values,
    stage_parameter_keys,
    stage_parameters,
)
from replication.pipeline.profiles import apply_profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m replication.pipeline", description=__doc__,
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
    pre = sub.add_parser("preflight", help="check the external inputs params.yaml needs "
                         "(hub, data, GPU); exit 1 listing every problem")
    pre.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    if args.command == "run":
        try:
            parameters = stage_parameters(args.stage, args.dvc_yaml, args.params)
        except (KeyError, FileNotFoundError) as err:  # unknown stage, key missing, no file
            raise SystemExit(f"[{args.stage}] {type(err).__name__}: {err}") from err
        if not args.notebook.is_file():
            raise SystemExit(f"[{args.stage}] no notebook {args.notebook} (dvc.yaml's cmd of the "
                             f"stage names it)")
        for name, value in args.parameter:
            if name in parameters:
                raise SystemExit(f"-p {name}: already a params.yaml parameter of {args.stage}")
            parameters[name] = value
        keys = stage_parameter_keys(args.stage, args.dvc_yaml, args.params)
        print(f"[{args.stage}] {args.notebook} -> {args.executed}", file=sys.stderr)
        for name, value in parameters.items():
            source = f"params.yaml {keys[name]}" if name in keys else "-p (dvc.yaml)"
            print(f"[{args.stage}]   {name} = {value!r}  ({source})", file=sys.stderr)
        try:
            check_values(parameters, declared_annotations(args.notebook), keys)
            run_notebook(args.notebook, args.executed, parameters)
        except (ParameterError, NotebookPairError) as err:
            raise SystemExit(f"[{args.stage}] {type(err).__name__}: {err}") from err
        except Exception as err:
            if type(err).__name__ != "PapermillExecutionError":
                raise
            print(f"[{args.stage}] failed in {args.notebook} (executed copy with the failing "
                  f"cell: {args.executed}). A parameter named in the error is set in params.yaml "
                  f"under: {', '.join(f'{n} = {k}' for n, k in keys.items()) or '(none)'}",
                  file=sys.stderr)
            raise SystemExit(f"[{args.stage}] {err.ename}: {err.evalue}") from err
    elif args.command == "apply-profile":
        for key in apply_profile(args.profile, args.params):
            print(f"set {key}")
    elif args.command == "preflight":
        from replication.pipeline.preflight import report

        raise SystemExit(report(args.params))


if __name__ == "__main__":
    main()
