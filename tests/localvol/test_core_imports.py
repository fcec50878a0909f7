"""The estimator is a package of its own: importable with torch, numpy, scipy and tqdm alone, and
it never imports the replication (the layers of docs/architecture.md)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import localvol

CORE = Path(localvol.__file__).resolve().parent
ALLOWED_TOP_LEVEL = {"localvol", "torch", "numpy", "scipy", "tqdm"}
REPLICATION_ONLY = {"replication", "pandas", "matplotlib", "seaborn", "transformers", "torchvision",
                    "dvc", "papermill", "nbformat", "ruamel", "yaml", "safetensors", "sklearn",
                    "jupyterlab"}


def test_core_source_imports_only_the_standard_library_torch_numpy_scipy_tqdm():
    stdlib = set(sys.stdlib_module_names)
    for path in sorted(CORE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED_TOP_LEVEL | stdlib, f"{path.name} imports {name}"


def test_importing_the_core_loads_no_replication_dependency():
    code = ("import sys, json, localvol; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                           text=True, check=True).stdout))
    assert not loaded & REPLICATION_ONLY, loaded & REPLICATION_ONLY
