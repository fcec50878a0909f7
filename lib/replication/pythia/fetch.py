"""Stage ``fetch_pythia`` (:func:`fetch_stage`; docs/experiments.md#pythia): write the
checkpoints of Figures 2, 4, 6 in the layout of :mod:`.checkpoints`.

- ``source: hub`` (paper profile): ``from_pretrained(repo_id, revision=f"step{N}")`` per step
  (:func:`fetch_hub`; a local folder holding ``step{N}/`` subfolders is read the same way,
  offline).
- ``source: local`` (default profile; no hub is reachable here): train a scaled-down Pythia
  here (:func:`replication.pythia.train.train_local`).

The tokenizer is ``fetch_pythia.tokenizer_path``'s, or when that is absent the tokenizer files
of ``fetch_pythia.repo_id`` (the manifest's ``tokenizer`` says which). A step or tokenizer that
cannot be loaded is an OSError naming the params.yaml key; ``python -m replication.pipeline
preflight`` checks all of them in seconds before any stage runs.

The manifest records each step's parameter SHA-256: two steps with identical weights are an
error (public Pythia revisions have been byte-identical across steps) unless the pair is listed
in ``fetch_pythia.known_duplicates``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from replication.pipeline.files import write_csv_atomic, write_json_atomic, write_timings
from replication.pythia.checkpoints import DUPLICATES_KEY, MANIFEST, check_steps, step_dir
from replication.pythia.data import tokenizer_with_fallback
from replication.pythia.train import train_local
from replication.sweep import check_distinct_steps, parameter_sha256

__all__ = ["fetch_hub", "fetch_stage", "check_fetch_settings"]


def fetch_hub(out_dir: str | os.PathLike, *, repo_id: str, steps: list[int],
              local_files_only: bool = False, progress: bool = True) -> dict[str, Any]:
    """Save ``from_pretrained(repo_id, revision=f"step{N}")`` (float32) as ``step{N}/`` for
    each step. ``repo_id`` may be a local folder of ``step{N}/`` subfolders (read offline).

    Returns the manifest (source, repo_id, steps, n_params, model config, parameter SHA-256 per
    step). Raises ValueError if the steps differ in parameter count, OSError naming
    ``fetch_pythia.repo_id`` / ``fetch_pythia.source`` and the step if a step cannot be loaded
    (missing, or the hub unreachable; chained with the loader's error)."""
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForCausalLM

    steps = check_steps(steps)
    n_params = None
    hashes = {}
    local = Path(repo_id).is_dir()
    for step in steps:
        try:
            if local:
                model = AutoModelForCausalLM.from_pretrained(
                    step_dir(repo_id, step), dtype=torch.float32, local_files_only=True)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    repo_id, revision=f"step{step}", dtype=torch.float32,
                    local_files_only=local_files_only)
        except (OSError, HfHubHTTPError) as err:
            where = (f"the local folder {step_dir(repo_id, step)}/ (config.json and weights)"
                     if local else f"revision step{step} of the Hugging Face hub repo {repo_id!r}")
            raise OSError(
                f"fetch_pythia.repo_id: cannot load step {step} from {where}: {err} -- set "
                "fetch_pythia.repo_id to a local folder of step{N}/ checkpoints (or a reachable "
                "hub repo with step{N} revisions), or fetch_pythia.source: local; `python -m "
                "replication.pipeline preflight` checks every step at once") from err
        n = sum(p.numel() for p in model.parameters())
        if n_params is not None and n != n_params:
            raise ValueError(f"step {step} has {n} parameters, earlier steps {n_params} "
                             "(fetch_pythia.repo_id)")
        n_params = n
        model.save_pretrained(step_dir(out_dir, step))
        hashes[str(step)] = parameter_sha256(model)
        if progress:
            print(f"step {step}: {n:,} parameters", flush=True)
    return {"source": "hub", "repo_id": str(repo_id), "steps": steps, "n_params": n_params,
            "config": model.config.to_dict(), "parameter_sha256": hashes}


def check_fetch_settings(*, source: str, hidden: int, layers: int, heads: int, intermediate: int,
                         seq_len: int, batch_size: int, lr: float, warmup: int,
                         weight_decay: float, betas: list[float], adam_eps: float,
                         grad_clip: float) -> None:
    """Raise ValueError naming the ``fetch_pythia`` key of the first bad setting."""
    if source not in ("hub", "local"):
        raise ValueError(f"fetch_pythia.source must be 'hub' or 'local', got {source!r}")
    for name, value in {"hidden": hidden, "layers": layers, "heads": heads,
                        "intermediate": intermediate, "seq_len": seq_len,
                        "batch_size": batch_size, "warmup": warmup}.items():
        if value < 1:
            raise ValueError(f"fetch_pythia.{name} must be ≥ 1, got {value}")
    for name, value, ok in (("lr", lr, lr > 0), ("weight_decay", weight_decay, weight_decay >= 0),
                            ("adam_eps", adam_eps, adam_eps > 0),
                            ("grad_clip", grad_clip, grad_clip > 0)):
        if not ok:
            bound = "≥ 0" if name == "weight_decay" else "> 0"
            raise ValueError(f"fetch_pythia.{name} must be {bound}, got {value}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"fetch_pythia.betas must be two numbers in [0, 1), got {betas}")


def fetch_stage(*, checkpoints_dir: str, history_path: str, source: str, steps: list[int], tokenizer_path: str,
                repo_id: str, hidden: int, layers: int, heads: int, intermediate: int,
                seq_len: int, batch_size: int, lr: float, warmup: int, weight_decay: float,
                betas: list[float], adam_eps: float, grad_clip: float, n_heldout: int,
                seed: int, known_duplicates: list[list[int]] | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run the ``fetch_pythia`` stage: write ``checkpoints_dir`` (see the module docstring)
    atomically (built beside it, then renamed; nothing is left on error) and its wall times
    beside it (``checkpoints.timings.json``). Arguments are the ``fetch_pythia`` keys.

    The tokenizer is ``tokenizer_path``'s, or when that is absent the tokenizer files of
    ``repo_id`` (:func:`.data.tokenizer_with_fallback`); the manifest's ``tokenizer`` says which.

    ``history_path``: a CSV of the training curve (step, train_loss, heldout_loss; the local
    source's losses, empty for hub checkpoints), what ``dvc plots`` draws.

    Returns the manifest. Raises ValueError for bad settings (:func:`check_fetch_settings`,
    :func:`.checkpoints.check_steps`) and for two steps with identical weights not listed in
    ``known_duplicates`` (``[[a, b], ...]``); OSError naming the params.yaml keys when the
    tokenizer or a hub step cannot be loaded (:func:`fetch_hub`)."""
    steps = check_steps(steps)
    known_duplicates = [list(map(int, pair)) for pair in (known_duplicates or [])]
    check_fetch_settings(source=source, hidden=hidden, layers=layers, heads=heads,
                         intermediate=intermediate, seq_len=seq_len, batch_size=batch_size,
                         lr=lr, warmup=warmup, weight_decay=weight_decay, betas=betas,
                         adam_eps=adam_eps, grad_clip=grad_clip)
    tokenizer, tokenizer_source = tokenizer_with_fallback(tokenizer_path, repo_id)
    out = Path(checkpoints_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if source == "local":
            manifest = train_local(
                tmp, tokenizer=tokenizer, steps=steps, hidden=hidden, layers=layers,
                heads=heads, intermediate=intermediate, seq_len=seq_len, batch_size=batch_size,
                lr=lr, warmup=warmup, weight_decay=weight_decay, betas=tuple(betas),
                adam_eps=adam_eps, grad_clip=grad_clip, n_heldout=n_heldout, seed=seed,
                progress=progress, timings=timings)
        else:
            manifest = fetch_hub(tmp, repo_id=repo_id, steps=steps, progress=progress)
        check_distinct_steps(manifest["parameter_sha256"], known_duplicates, key=DUPLICATES_KEY)
        manifest["known_duplicates"] = known_duplicates
        tokenizer.save_pretrained(tmp / "tokenizer")
        manifest["tokenizer"] = tokenizer_source
        write_json_atomic(tmp / MANIFEST, manifest)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    history = {h["step"]: h for h in manifest.get("history", [])}
    write_csv_atomic(history_path, [{"step": s, **history.get(s, {})} for s in steps],
                     columns=["step", "train_loss", "heldout_loss"])
    write_timings(out, {**timings, "wall_time_s": time.perf_counter() - t0})
    return manifest
