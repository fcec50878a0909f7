"""JupyterLab in a real browser (headless Chromium) does not invalidate DVC.

In a temporary copy of the repository with the `split_digits` stage reproduced, JupyterLab is
started with `make lab` (as users start it) and the stage notebook, a heavier one and the
read-only executed copy are opened (each starts a kernel), saved with Ctrl+S and left open past
the autosave interval. JupyterLab must really write the opened notebooks (else this proves
nothing), while the X.py files DVC depends on, the executed copy, and `dvc status` stay as they
were. Then a cell is edited in the browser and saved: now X.py changes and `dvc status` reports
the stage changed.

JupyterLab autosaves every 120 s by default (@jupyterlab/docmanager-extension:plugin,
autosaveInterval); the test sets AUTOSAVE_S in a user settings folder of its own so as not to
wait that long. `jupyterlab_driver.py` runs the same check by hand on the real repository with
the default interval.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from jupyterlab_driver import JupyterLab, LabBrowser, file_digests, missing_browser
from test_dvc_repro import BIN, REPO, fresh_copy, run

REASON = missing_browser()
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(REASON is not None, reason=REASON or "")]

AUTOSAVE_S = 3  # seconds; JupyterLab's default is 120
STAGE_NOTEBOOK = "notebooks/split_digits.ipynb"
HEAVY_NOTEBOOK = "notebooks/estimate_figure1.ipynb"  # a stage with a GPU-sized sweep
EXECUTED = "results/notebooks/split_digits.ipynb"  # read-only executed copy (a DVC out)
EDIT = "# edited in JupyterLab"


def _copy_with_split_digits_reproduced(tmp_path: Path) -> Path:
    work = fresh_copy(tmp_path)
    # `make lab` runs .venv/bin/jupyter of the repository: this environment's
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    run(["git", "init", "-q"], work)  # DVC's repo is a git repo; no commit is needed
    run([str(BIN / "python"), "-m", "replication.mlp.data", "write-data", "data/digits"], work)
    run([str(BIN / "dvc"), "add", "--quiet", "data"], work)
    run([str(BIN / "dvc"), "repro", "split_digits"], work)
    return work


def _status(work: Path, *stages: str) -> dict:
    return json.loads(run([str(BIN / "dvc"), "status", "--json", *stages], work))


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.25)


def test_jupyterlab_in_chromium_leaves_dvc_up_to_date_until_a_cell_is_edited(tmp_path):
    work = _copy_with_split_digits_reproduced(tmp_path)
    assert _status(work, "split_digits") == {}
    status_before = _status(work)
    pairs = [STAGE_NOTEBOOK, STAGE_NOTEBOOK.replace(".ipynb", ".py"),
             HEAVY_NOTEBOOK, HEAVY_NOTEBOOK.replace(".ipynb", ".py"), EXECUTED]
    before = file_digests(work / p for p in pairs)
    mtimes = {p: (work / p).stat().st_mtime_ns for p in (STAGE_NOTEBOOK, HEAVY_NOTEBOOK)}

    # the server's kernels import this copy's lib/ (as test_dvc_repro's stages do)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(work / "lib"))
    with JupyterLab(work, autosave_interval=AUTOSAVE_S, via_make=True, env=env) as lab:
        browser = LabBrowser(lab)
        try:
            opened = (STAGE_NOTEBOOK, HEAVY_NOTEBOOK, EXECUTED)
            for path in opened:
                browser.open(path)
            dialogs = []
            for path in opened:
                browser.wait_kernel_idle(path)
                time.sleep(AUTOSAVE_S + 2)  # past the autosave interval
                browser.save_shortcut(path)
                dialogs += browser.dismiss_dialogs()
            time.sleep(AUTOSAVE_S + 2)
            dialogs += browser.dismiss_dialogs()
            states = {path: browser.state(path) for path in opened}
            after = file_digests(work / p for p in pairs)

            # JupyterLab (through Jupytext) wrote the notebooks it opened ...
            for path, mtime in mtimes.items():
                assert (work / path).stat().st_mtime_ns != mtime, \
                    f"JupyterLab never saved {path}: the test would prove nothing ({states})"
                assert not states[path]["dirty"], states
            # ... but not the .py files DVC depends on, nor the read-only executed copy
            for path in pairs[1], pairs[3], EXECUTED:
                assert after[str(work / path)] == before[str(work / path)], \
                    f"{path} changed on opening and saving in JupyterLab (dialogs: {dialogs})"
            assert (work / EXECUTED).stat().st_mode & 0o777 == 0o444
            assert _status(work, "split_digits") == {}
            assert _status(work) == status_before

            # an edit in the browser: Jupytext writes it to X.py, and the stage is stale
            browser.type_in_cell(STAGE_NOTEBOOK, 3, "\n" + EDIT)
            # the edit is in the browser's model (its `dirty` flag is no witness: the 3 s
            # autosave may clear it before a poll on busy cores sees it set)
            _wait_until(lambda: EDIT in (browser.cell_source(STAGE_NOTEBOOK, 3) or ""), 60,
                        "the typed edit to reach the notebook's cell")
            browser.save_shortcut(STAGE_NOTEBOOK)
            script = work / STAGE_NOTEBOOK.replace(".ipynb", ".py")
            _wait_until(lambda: EDIT in script.read_text(), 20, f"{EDIT!r} in {script}")
        finally:
            browser.quit()
    assert EDIT in (work / STAGE_NOTEBOOK).read_text()
    from replication.pipeline.notebooks import read_notebook

    read_notebook(script)  # the pair is in step (raises NotebookPairError otherwise)
    assert _status(work, "split_digits") == {
        "split_digits": [{"changed deps": {"notebooks/split_digits.py": "modified"}}]}
    assert file_digests([work / EXECUTED]) == {str(work / EXECUTED): before[str(work / EXECUTED)]}
