"""The environment is pinned, and pinned the same way everywhere: pyproject.toml (pip),
environment.yml (conda), requirements-lock.txt (full freeze) and the installed venv."""

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
ASKED_FOR = {"torch", "jupyterlab", "papermill", "matplotlib", "seaborn", "scipy",
             "torchvision", "transformers", "dvc"}
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = PIN.match(line.strip())
        assert m, f"not an exact pin: {line!r}"
        pins[norm(m.group(1))] = m.group(2)
    return pins


def pyproject_pins() -> dict[str, str]:
    """The core's dependencies and every extra's, together."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [d for deps in project["optional-dependencies"].values() for d in deps]
    return parse(project["dependencies"] + extras)


def test_the_estimator_needs_only_torch_numpy_scipy_and_tqdm():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert set(parse(project["dependencies"])) == {"torch", "numpy", "scipy", "tqdm"}
    assert set(project["optional-dependencies"]) == {"replication", "test"}


def conda_env() -> dict:
    return YAML(typ="safe").load((REPO / "environment.yml").read_text())


def lock_pins() -> dict[str, str]:
    lines = [l for l in (REPO / "requirements-lock.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    return parse(lines)


def test_pyproject_pins_the_requested_packages():
    pins = pyproject_pins()
    assert ASKED_FOR <= set(pins)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_environment_yml_lists_the_same_pins_and_python_3_11():
    deps = conda_env()["dependencies"]
    assert "python=3.11" in deps
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1
    pins = parse([d for d in pip_lists[0] if not d.startswith("-e")])
    assert pins == pyproject_pins()
    assert "-e .[replication,test]" in [d.split("#")[0].strip() for d in pip_lists[0]]


def test_lock_file_agrees_with_the_pins():
    lock = lock_pins()
    for name, version in pyproject_pins().items():
        assert lock.get(name) == version, f"{name}: lock {lock.get(name)} != pin {version}"
    assert "localvol" not in lock


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the pins are for Python 3.11")
def test_installed_versions_match_the_pins():
    for name, version in pyproject_pins().items():
        assert metadata.version(name) == version, name
