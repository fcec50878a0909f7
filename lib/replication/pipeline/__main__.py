"""Command line of the pipeline (what ``dvc.yaml`` and the Makefile run)::

    python -m replication.pipeline run STAGE NOTEBOOK EXECUTED [-p NAME VALUE ...]
    python -m replication.pipeline apply-profile profiles/tiny.yaml

``run`` reads the keys listed under ``stages.STAGE.params`` in ``dvc.yaml`` from ``params.yaml``
(so each key is listed once, in ``dvc.yaml``, and DVC tracks exactly what the notebook gets),
injects each under its last path component (``train_mlp.lr`` → ``lr``), adds the ``-p`` pairs
(output paths, as strings), and executes the notebook with papermill on kernel ``python3``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from replication.pipeline.notebooks import run_notebook
from replication.pipeline.parameters import stage_parameters
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
