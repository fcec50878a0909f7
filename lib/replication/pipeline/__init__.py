"""Pipeline plumbing shared by every stage: notebook parameters (:mod:`.parameters`), running a
notebook (:mod:`.notebooks`), profiles (:mod:`.profiles`) and result files (:mod:`.files`).
Nothing here knows about an experiment."""

from replication.pipeline.files import (
    atomic_path,
    read_json,
    save_npz_atomic,
    write_csv_atomic,
    timings_path,
    to_jsonable,
    write_json_atomic,
    write_timings,
)
from replication.pipeline.notebooks import (
    NotebookPairError,
    declared_parameters,
    read_notebook,
    run_notebook,
)
from replication.pipeline.parameters import (
    ParameterError,
    check_parameters,
    notebook_setup,
    repository_root,
    stage_parameters,
    stage_paths,
)
from replication.pipeline.profiles import apply_profile

__all__ = ["ParameterError", "check_parameters", "notebook_setup", "repository_root",
           "stage_parameters", "stage_paths", "NotebookPairError", "read_notebook", "declared_parameters",
           "run_notebook", "apply_profile", "atomic_path", "to_jsonable", "write_json_atomic",
           "read_json", "save_npz_atomic", "write_csv_atomic", "timings_path", "write_timings"]
