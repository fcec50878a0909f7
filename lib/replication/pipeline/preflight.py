"""Preflight: before any stage runs, check in seconds that every external input the ACTIVE
``params.yaml`` settings need is there, and list every missing one at once, each with the
params.yaml key that fixes it (``python -m replication.pipeline preflight``; ``make reproduce``
runs it first, so a paper-profile run fails at once instead of inside stage fetch_pythia).

What is checked (:func:`check_inputs`):

- ``fetch_pythia``: ``source`` hub: ``repo_id`` is a local folder holding ``step{N}/``
  (config.json and weights) for every N of ``steps``, or a hub repo with a ``step{N}``
  revision for each (one request, :func:`hub_branches`). ``tokenizer_path`` exists, or its
  fallback, the tokenizer of ``repo_id``, is reachable.
- ``pythia_estimate``: ``eval_source`` "local" (local source only), or a JSONL file with
  enough documents that have a "text" (with hub checkpoints and squared gradients also the
  squared-gradient documents after them); ``adam_source: optimizer_state`` with hub checkpoints
  needs ``raw_checkpoint_dir/global_step{N}/mp_rank_00_model_states.pt`` for each trained step.
- ``prepare_cifar``: ``local_copy`` holds the JPEG trees; or ("" or absent: torchvision's
  download) ``download_root`` already holds CIFAR-10, or the download URL answers a HEAD request.
- ``device`` of ``train_convnext``, ``convnext_estimate``, ``pythia_estimate``: "cuda" needs a
  GPU (:func:`replication.pipeline.devices.resolve_device`).

Network checks never retry and give up after a few seconds (:data:`TIMEOUT_S`); with
``HF_HUB_OFFLINE=1`` the hub check fails at once. Relative paths are relative to ``root`` (the
repository root, where the stages run).
"""

from __future__ import annotations

import sys
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

__all__ = ["TIMEOUT_S", "check_inputs", "hub_branches", "url_error", "report"]

TIMEOUT_S = 5.0  # seconds, per network check
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
           "pytorch_model.bin.index.json")
DEVICE_SECTIONS = ("train_convnext", "convnext_estimate", "pythia_estimate")


def _call_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()``, or TimeoutError after ``timeout`` s (the call is left to finish in a daemon
    thread: neither huggingface_hub's client nor DNS resolution has a timeout of its own)."""
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # handed to the caller
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def hub_branches(repo_id: str, timeout: float = TIMEOUT_S) -> tuple[set[str] | None, str | None]:
    """The branch names of a Hugging Face hub model repo (``huggingface_hub.list_repo_refs``,
    one request, at most ``timeout`` s): ``(names, None)``, or ``(None, why)`` when the hub
    cannot be reached (``HF_HUB_OFFLINE=1``, no network), the repo does not exist, or
    ``repo_id`` is not a valid repo id."""
    from huggingface_hub import list_repo_refs

    try:
        refs = _call_with_timeout(lambda: list_repo_refs(repo_id), timeout)
    except Exception as err:  # offline, DNS, HTTP 401/404, an invalid id
        return None, _why(err)
    return {b.name for b in refs.branches}, None


def url_error(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None if ``url`` answers a HEAD request with a status below 400 within ``timeout`` s,
    else why not (one line)."""

    def head():
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=timeout) as response:
            return response.status

    try:
        status = _call_with_timeout(head, timeout)
    except (urllib.error.URLError, OSError, ValueError) as err:  # incl. HTTPError, TimeoutError
        return _why(err)
    return None if status < 400 else f"HTTP {status}"


class _Checker:
    """One run of the checks: ``root`` for relative paths, the hub answer cached per repo."""

    def __init__(self, params: dict, root: Path):
        self.params, self.root = params, root
        self.problems: list[str] = []
        self._hub: dict[str, tuple[set[str] | None, str | None]] = {}

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    def hub(self, repo_id: str) -> tuple[set[str] | None, str | None]:
        if repo_id not in self._hub:
            self._hub[repo_id] = hub_branches(repo_id)
        return self._hub[repo_id]

    def section(self, name: str) -> dict:
        return self.params.get(name) or {}

    def count(self, section: str, key: str, default: int = 0) -> int:
        """A non-negative integer setting; a problem naming the key (and 0) otherwise."""
        value = self.section(section).get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.problems.append(f"{section}.{key} must be a non-negative integer, got {value!r}")
            return 0
        return value

    # ---- Pythia --------------------------------------------------------------------------

    def fetch_pythia(self) -> None:
        from replication.pythia.checkpoints import check_steps, step_dir

        fetch = self.section("fetch_pythia")
        source, repo_id = fetch.get("source", "local"), str(fetch.get("repo_id", ""))
        if source not in ("hub", "local"):
            self.problems.append(f"fetch_pythia.source must be 'hub' or 'local', got {source!r}")
            return
        try:
            steps = check_steps(fetch.get("steps", []))
        except ValueError as err:
            self.problems.append(str(err))
            steps = []
        folder = self.path(repo_id) if repo_id else None
        if source == "hub" and repo_id.startswith(("/", ".", "~")) and not folder.is_dir():
            self.problems.append(
                f"fetch_pythia.repo_id: the local folder {repo_id} ({folder}) does not exist: "
                "point it at a folder of step{N}/ checkpoints, or at a hub repository such as "
                "EleutherAI/pythia-31m")
            folder = None
        elif source == "hub" and folder is not None and folder.is_dir():
            missing = [n for n in steps
                       if not (step_dir(folder, n) / "config.json").is_file()
                       or not any((step_dir(folder, n) / w).is_file() for w in WEIGHTS)]
            if missing:
                self.problems.append(
                    f"fetch_pythia.repo_id: the local folder {folder} lacks step{{N}}/ "
                    f"(config.json and weights) for {len(missing)} of the {len(steps)} steps "
                    f"of fetch_pythia.steps: {', '.join(f'step{n}' for n in missing)}; add "
                    "them, or drop those steps from fetch_pythia.steps")
        elif source == "hub":
            branches, why = self.hub(repo_id)
            if why is not None:
                self.problems.append(
                    f"fetch_pythia.repo_id: cannot reach the Hugging Face hub for {repo_id!r} "
                    f"({why}): set fetch_pythia.repo_id to a local folder of step{{N}}/ "
                    "checkpoints, or fetch_pythia.source: local")
            else:
                missing = [n for n in steps if f"step{n}" not in branches]
                if missing:
                    self.problems.append(
                        f"fetch_pythia.steps: the hub repo {repo_id!r} has no revision "
                        f"{', '.join(f'step{n}' for n in missing)}: drop those steps from "
                        "fetch_pythia.steps, or set fetch_pythia.repo_id to a repo that has them")
        self.tokenizer(fetch, repo_id, folder)

    def tokenizer(self, fetch: dict, repo_id: str, folder: Path | None) -> None:
        """fetch_pythia.tokenizer_path, or its fallback (replication.pythia.data
        tokenizer_with_fallback): the tokenizer files of repo_id."""
        path = fetch.get("tokenizer_path", "")
        fix = ("set fetch_pythia.tokenizer_path to the GPT-NeoX-20B tokenizer.json file "
               "(relative paths are relative to the repository root, "
               f"{self.root})")
        if path and self.path(path).is_dir():
            self.problems.append(f"fetch_pythia.tokenizer_path: {path} is a folder: {fix}")
            return
        if path and self.path(path).is_file():
            from tokenizers import Tokenizer

            try:
                Tokenizer.from_file(str(self.path(path)))
            except Exception as err:  # noqa: BLE001 - any failure to load is the problem
                self.problems.append(f"fetch_pythia.tokenizer_path: {path} is not a tokenizer "
                                     f"file the tokenizers library can load ({_why(err)}): {fix}")
            return
        absent = f"fetch_pythia.tokenizer_path: {path!r} not found"
        if folder is not None and folder.is_dir():
            if not (folder / "tokenizer.json").is_file():
                self.problems.append(f"{absent}, and the fallback, the tokenizer of "
                                     f"fetch_pythia.repo_id, is not there either (no "
                                     f"{folder / 'tokenizer.json'}): {fix}")
            return
        _, why = self.hub(repo_id)
        if why is not None:
            self.problems.append(f"{absent}, and the fallback, the hub tokenizer of "
                                 f"fetch_pythia.repo_id {repo_id!r}, is unreachable ({why}): "
                                 f"{fix}")

    def pythia_estimate(self) -> None:
        from replication.pythia.data import eval_texts
        from replication.pythia.points import ADAM_SOURCES

        fetch, est = self.section("fetch_pythia"), self.section("pythia_estimate")
        hub = fetch.get("source", "local") == "hub"
        eval_source = est.get("eval_source", "local")
        adam_source = est.get("adam_source", "optimizer_state")
        if adam_source not in ADAM_SOURCES:
            self.problems.append(f"pythia_estimate.adam_source must be one of {ADAM_SOURCES}, "
                                 f"got {adam_source!r}")
        compare = (self.section("estimate_figure2").get("compare_squared_gradients", False)
                   and adam_source == "optimizer_state")
        # hub checkpoints draw the squared-gradient text from the JSONL, after the eval documents
        sqgrad_docs = (self.count("pythia_estimate", "sqgrad_batches")
                       * self.count("pythia_estimate", "sqgrad_batch_size")
                       if hub and (adam_source == "squared_gradients" or compare) else 0)
        n_docs = self.count("pythia_estimate", "n_eval_docs", default=1)
        if eval_source == "local":
            if hub:
                self.problems.append(
                    "pythia_estimate.eval_source: 'local' (held-out pydoc topics) needs "
                    "fetch_pythia.source: local; for hub checkpoints give a JSONL file of "
                    "{\"text\": ...} documents (The Pile's val.jsonl)")
        else:
            need = n_docs + sqgrad_docs
            why = (f" (pythia_estimate.n_eval_docs {n_docs} + sqgrad_batches × sqgrad_batch_size "
                   f"{sqgrad_docs}: hub checkpoints draw the squared-gradient text from it)"
                   if sqgrad_docs else "")
            if self.path(eval_source).is_dir():
                self.problems.append(f"pythia_estimate.eval_source: {eval_source} is a folder, "
                                     "not a JSONL file of {\"text\": ...} documents")
                return
            try:
                eval_texts(str(self.path(eval_source)), need, {})
            except FileNotFoundError:
                self.problems.append(
                    f"pythia_estimate.eval_source: {eval_source} not found: give a JSONL file "
                    f"with at least {need} {{\"text\": ...}} documents{why} (The Pile's "
                    "val.jsonl), or 'local' with fetch_pythia.source: local")
            except ValueError as err:
                self.problems.append(f"pythia_estimate.eval_source: {err}{why}; add documents, "
                                     "or lower pythia_estimate.n_eval_docs")
        if hub and adam_source == "optimizer_state":
            self.raw_checkpoints(fetch, est)

    def raw_checkpoints(self, fetch: dict, est: dict) -> None:
        """Hub checkpoints carry no optimizer.pt: optimizer_state_nu (replication.pythia.moments)
        then reads raw DeepSpeed files for every trained step."""
        raw = est.get("raw_checkpoint_dir", "")
        fix = ("set pythia_estimate.adam_source: squared_gradients, or "
               "pythia_estimate.raw_checkpoint_dir to the GPT-NeoX/DeepSpeed global_step{N}/ "
               "folders")
        if not raw:
            self.problems.append("pythia_estimate.adam_source: optimizer_state needs an optimizer "
                                 "state, which hub checkpoints lack, and "
                                 f"pythia_estimate.raw_checkpoint_dir is empty: {fix}")
            return
        steps = [n for n in fetch.get("steps", []) if isinstance(n, int) and n > 0]
        missing = [n for n in steps if not (self.path(raw) / f"global_step{n}"
                                            / "mp_rank_00_model_states.pt").is_file()]
        if missing:
            self.problems.append(
                f"pythia_estimate.raw_checkpoint_dir: {raw} lacks global_step{{N}}/"
                f"mp_rank_00_model_states.pt for {', '.join(f'step {n}' for n in missing)} "
                f"(pythia_estimate.adam_source: optimizer_state): {fix}")

    # ---- CIFAR-10 --------------------------------------------------------------------------

    def prepare_cifar(self) -> None:
        from replication.convnext.data import CLASSES

        pc = self.section("prepare_cifar")
        local_copy, download_root = pc.get("local_copy", ""), pc.get("download_root", "")
        if local_copy and self.path(local_copy).is_file():
            self.problems.append(
                f"prepare_cifar.local_copy: {local_copy} is a file: point it at the folder that "
                "holds train.tar.gz and test.tar.gz (or train/ and test/ JPEG trees)")
            return
        if local_copy and self.path(local_copy).exists():
            folder = self.path(local_copy)
            for split in ("train", "test"):
                why = _jpeg_split_problem(folder, split, CLASSES)
                if why:
                    self.problems.append(f"prepare_cifar.local_copy: {local_copy}: {why} (expected "
                                         f"{split}.tar.gz or {split}/<class>/NNNN.jpg)")
            return
        if _torchvision_has_cifar10(self.path(download_root)):
            return
        from torchvision.datasets import CIFAR10

        why = url_error(CIFAR10.url)
        if why is not None:
            first = (f"prepare_cifar.local_copy: {local_copy} does not exist (fallback: "
                     "torchvision's download)" if local_copy else
                     "prepare_cifar.local_copy is empty (torchvision's download)")
            self.problems.append(
                f"{first}, prepare_cifar.download_root {download_root} holds no CIFAR-10, and "
                f"{CIFAR10.url} is unreachable ({why}): set prepare_cifar.local_copy to a JPEG "
                "copy (e.g. ../shared/data/cifar10-jpeg), or put cifar-10-batches-py/ (or "
                f"{CIFAR10.filename}) under prepare_cifar.download_root")

    # ---- the pipeline's own files -------------------------------------------------------------

    def notebook_pairs(self) -> None:
        """Every notebooks/X.ipynb in step with X.py (what dvc.yaml runs): an .ipynb edited
        without Jupytext changes no DVC dependency, so only this check can see it."""
        from replication.pipeline.notebooks import NotebookPairError, read_notebook

        for script in sorted((self.root / "notebooks").glob("*.py")):
            try:
                read_notebook(script)
            except NotebookPairError as err:
                self.problems.append(str(err))

    def unknown_keys(self, dvc_yaml: Path) -> None:
        """params.yaml keys that no stage of dvc.yaml reads (a misspelt key is silently
        ignored by DVC, and the notebook's default applies)."""
        import difflib

        from replication.pipeline.parameters import load_yaml

        if not dvc_yaml.is_file():
            return
        read = {key for stage in (load_yaml(dvc_yaml).get("stages") or {}).values()
                for key in stage.get("params", []) if isinstance(key, str)}
        sections = {key.split(".", 1)[0] for key in read}
        for section, values in self.params.items():
            if section not in sections:
                close = difflib.get_close_matches(section, sections, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problems.append(f"params.yaml section {section!r} is read by no stage of "
                                     f"dvc.yaml{hint}: rename or delete it")
                continue
            known = [k.split(".", 1)[1] for k in read if k.startswith(section + ".")]
            for key in values or {}:
                if f"{section}.{key}" not in read:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {section}.{close[0]}?)" if close else ""
                    self.problems.append(f"{section}.{key} is read by no stage of dvc.yaml"
                                         f"{hint}: rename or delete it")

    # ---- devices ---------------------------------------------------------------------------

    def devices(self) -> None:
        from replication.pipeline.devices import resolve_device

        for name in DEVICE_SECTIONS:
            if name in self.params:
                try:
                    resolve_device(self.section(name).get("device", "auto"), f"{name}.device")
                except ValueError as err:
                    self.problems.append(str(err))


def _jpeg_split_problem(folder: Path, split: str, classes: tuple[str, ...]) -> str | None:
    """Why ``folder`` holds no JPEG tree of ``split`` (a quick look: the archive's first file,
    or the class folders), or None."""
    archive, tree = folder / f"{split}.tar.gz", folder / split
    if archive.is_file():
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    if member.isfile():
                        parts = member.name.split("/")
                        if len(parts) < 3 or parts[-3] != split or parts[-2] not in classes:
                            return (f"{archive.name} starts with {member.name}, not "
                                    f"{split}/<class>/NNNN.jpg")
                        return None
        except (tarfile.TarError, OSError, EOFError) as err:
            return f"{archive.name} is not a readable .tar.gz ({_why(err)})"
        return f"{archive.name} holds no files"
    if tree.is_dir():
        found = sorted(d.name for d in tree.iterdir() if d.is_dir())
        unknown = [d for d in found if d not in classes]
        if not found or unknown:
            return (f"{split}/ has class folders {found}, expected the CIFAR-10 classes "
                    f"{list(classes)}")
        return None
    return f"neither {split}.tar.gz nor {split}/ exists"


def _torchvision_has_cifar10(download_root: Path) -> bool:
    """Whether ``CIFAR10(download_root, download=True)`` would need no download: the extracted
    batches or the archive are there with torchvision's MD5s."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    extracted = all(check_integrity(str(download_root / CIFAR10.base_folder / name), md5)
                    for name, md5 in CIFAR10.train_list + CIFAR10.test_list)
    return extracted or check_integrity(str(download_root / CIFAR10.filename), CIFAR10.tgz_md5)


def check_inputs(params: dict, *, root: str | Path | None = None) -> list[str]:
    """Check the external inputs of the active settings (module docstring).

    Args:
        params: params.yaml as loaded by :func:`replication.pipeline.parameters.load_yaml`.
        root: folder that relative paths are relative to (default: the working directory,
            the repository root where the stages run).

    Returns:
        One message per problem (empty: all found), each starting with, and saying how to
        change, the params.yaml key that fixes it. Never raises for a missing input.
    """
    checker = _Checker(params, Path.cwd() if root is None else Path(root))
    checker.fetch_pythia()
    checker.pythia_estimate()
    checker.prepare_cifar()
    checker.devices()
    checker.notebook_pairs()
    checker.unknown_keys(checker.root / "dvc.yaml")
    return checker.problems


def report(params_yaml: str | Path = "params.yaml") -> int:
    """The ``preflight`` command: print every problem of ``params_yaml`` (relative paths from
    the working directory) to stderr and return 1, or print one "all found" line and return 0."""
    from replication.pipeline.parameters import load_yaml

    from ruamel.yaml.error import YAMLError

    try:
        params = load_yaml(params_yaml)
    except (OSError, ValueError, YAMLError) as err:  # a missing file, or YAML that won't parse
        why = " ".join(str(err).split())
        print(f"preflight: cannot read {params_yaml}: {type(err).__name__}: {why}",
              file=sys.stderr)
        return 1
    if not isinstance(params, dict):
        print(f"preflight: {params_yaml} is not a mapping of sections", file=sys.stderr)
        return 1
    problems = check_inputs(params)
    if problems:
        print(f"preflight: {len(problems)} problem(s) with the external inputs of "
              f"{params_yaml}:", file=sys.stderr)
        for message in problems:
            print(f"  - {message}", file=sys.stderr)
        return 1
    print("preflight: all external inputs found")
    return 0
