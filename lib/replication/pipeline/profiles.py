"""Parameter profiles: overwrite values of ``params.yaml`` with those of ``profiles/NAME.yaml``."""

from __future__ import annotations

from pathlib import Path

from replication.pipeline.files import atomic_path
from replication.pipeline.parameters import load_yaml

__all__ = ["apply_profile"]


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
    overrides = load_yaml(profile) or {}
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

