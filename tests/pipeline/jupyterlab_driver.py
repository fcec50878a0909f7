"""Drive JupyterLab in headless Chromium: start a server on a folder, open notebooks the way a
user does (each gets a kernel), optionally press the save shortcut, wait, stop; report which
files changed on disk.

Used by ``test_jupyterlab_browser.py``, and by hand on the real repository, e.g. after
``dvc repro``, to show that viewing the notebooks leaves ``dvc status`` clean::

    .venv/bin/python tests/pipeline/jupyterlab_driver.py --root . \\
        notebooks/*.ipynb results/notebooks/*.ipynb --wait 150
    .venv/bin/dvc status

``--wait 150`` outlasts JupyterLab's default autosave interval (120 s), which this script keeps
unless given ``--autosave-interval``; ``--save`` also presses Ctrl+S in each notebook. The
server is started with ``make -o setup lab`` when the root has a Makefile (``--direct``: plain
``jupyter lab``), so it runs with the options users get. It prints each notebook's state, any
dialog JupyterLab showed, and which opened files or their ``X.py`` pairs changed bytes. Needs Debian's ``chromium`` and ``chromedriver`` (in
/usr/bin) and ``selenium`` (the ``test`` extra). The network may be closed: Chromium runs with
every background connection switched off, and JupyterLab with news and update checks off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["CHROMIUM", "CHROMEDRIVER", "DEFAULT_AUTOSAVE_S", "missing_browser", "JupyterLab",
           "LabBrowser", "file_digests", "main"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# JupyterLab's own default (@jupyterlab/docmanager-extension:plugin, autosaveInterval, seconds)
DEFAULT_AUTOSAVE_S = 120
BIN = Path(sys.executable).parent

# Chromium flags for a machine without network or display: without the network switches it
# stalls on refused connections (component updates, sync, QUIC probes).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1400,1000")


def missing_browser() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return (f"{path} not found: install Debian's chromium and chromium-driver "
                    f"(apt-get install chromium chromium-driver; .ci/run does it in CI)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def file_digests(paths) -> dict[str, str | None]:
    """{path: sha256 of its bytes, or None when missing}."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).exists() else None
            for p in paths}


class JupyterLab:
    """JupyterLab serving ``root`` on a free local port with a random token, with its own
    settings and workspaces folders (so no saved layout reopens old tabs).

    With ``via_make`` (the default when ``root`` has a Makefile with a ``lab`` target), it is
    started the way users start it, ``make lab`` (``-o setup``: without reinstalling anything;
    ``root/.venv`` must exist), with the options below in ``ARGS``; otherwise as
    ``jupyter lab --notebook-dir=root`` of the running interpreter's environment.
    ``autosave_interval``: seconds, ``None`` for JupyterLab's default (120 s).
    ``expose_app_in_browser`` gives the page ``window.jupyterapp``, which :class:`LabBrowser`
    uses to open documents and read kernel and save state. Use as a context manager; the
    server is shut down (kernels included) on exit."""

    def __init__(self, root: str | Path, *, autosave_interval: float | None = None,
                 via_make: bool | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 90.0):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"JupyterLab root {self.root} is not a folder")
        if via_make is None:
            makefile = self.root / "Makefile"
            via_make = makefile.is_file() and "\nlab:" in makefile.read_text()
        self.via_make = via_make
        self.autosave_interval = autosave_interval
        self.env = env
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="jupyterlab-driver-")
        self.log_path = Path(self._tmp.name) / "jupyterlab.log"

    def _write_settings(self) -> Path:
        settings = Path(self._tmp.name) / "user-settings"
        plugins = {
            # no requests to the internet, no "receive news?" toast over the notebook
            ("apputils-extension", "notification"): {"fetchNews": "false",
                                                     "checkForUpdates": False},
        }
        if self.autosave_interval is not None:
            plugins[("docmanager-extension", "plugin")] = {
                "autosave": True, "autosaveInterval": self.autosave_interval}
        for (package, plugin), values in plugins.items():
            path = settings / "@jupyterlab" / package / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        return settings

    def command(self) -> list[str]:
        """The command line that starts the server."""
        options = ["--no-browser", f"--port={self.port}", "--ServerApp.ip=127.0.0.1",
                   "--ServerApp.port_retries=0", f"--ServerApp.token={self.token}",
                   f"--LabApp.user_settings_dir={self._write_settings()}",
                   f"--LabApp.workspaces_dir={Path(self._tmp.name) / 'workspaces'}",
                   "--LabApp.expose_app_in_browser=True"]
        if self.via_make:
            return ["make", "--no-print-directory", "-C", str(self.root), "-o", "setup", "lab",
                    "ARGS=" + " ".join(shlex.quote(o) for o in options)]
        cmd = [str(BIN / "jupyter"), "lab", f"--notebook-dir={self.root}", *options]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # as `make lab` does
        return cmd

    def start(self) -> "JupyterLab":
        cmd = self.command()
        env = dict(self.env if self.env is not None else os.environ)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{shlex.join(cmd)} exited ({self.process.returncode}):\n"
                                   f"{self.log()}")
            try:
                self.api("GET", "api/status")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{shlex.join(cmd)}: no answer within {self.startup_timeout} s:\n"
                           f"{self.log()}")

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """Call the server's REST API (``path`` like ``api/contents/notebooks/x.ipynb``)."""
        request = urllib.request.Request(
            f"{self.base}/{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text else {}

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Shut the server down (it stops its kernels), then end whatever is left of the
        process group started here."""
        if self.process is not None and self.process.poll() is None:
            pgid = os.getpgid(self.process.pid)
            try:
                self.api("POST", "api/shutdown")
                self.process.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(pgid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        self._tmp.cleanup()

    def __enter__(self) -> "JupyterLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# JavaScript run in the page (window.jupyterapp, JupyterLab 4): the open document widget of a
# path, its kernel status, unsaved changes and save count.
_FIND = """
const path = arguments[0];
const widget = Array.from(jupyterapp.shell.widgets('main')).find(w => w.context && w.context.path === path);
"""


class LabBrowser:
    """Headless Chromium (Debian's, through chromedriver) showing one JupyterLab page. Each
    notebook is opened in that page as the File browser does (``docmanager:open``), which
    starts its kernel; :meth:`save_shortcut` presses Ctrl+S in it, :meth:`type_in_cell` types
    into a cell's editor."""

    def __init__(self, lab: JupyterLab, *, timeout: float = 90.0):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.lab = lab
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self._profile.name}")
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        self.driver.set_script_timeout(timeout)
        self.driver.get(f"{lab.base}/lab?token={lab.token}")
        self._wait_for("return !!(window.jupyterapp && jupyterapp.shell)", "JupyterLab to load")
        self._run_async("jupyterapp.restored.then(() => done(true))")

    # -- helpers ----------------------------------------------------------------------------

    def _run_async(self, body: str, *args):
        script = "const done = arguments[arguments.length - 1];\n" + body
        return self.driver.execute_async_script(script, *args)

    def _wait_for(self, script: str, what: str, *args, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.timeout)
        value = None
        while time.monotonic() < deadline:
            value = self.driver.execute_script(script, *args)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout or self.timeout} s for {what} (last: {value!r});"
                           f" dialogs: {self.dialogs()}\nserver log:\n{self.lab.log(3000)}")

    def dialogs(self) -> list[str]:
        """Texts of the modal dialogs now shown (e.g. 'Cannot Save')."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('.jp-Dialog')).map(d => d.innerText)")

    def dismiss_dialogs(self) -> list[str]:
        """Close every modal dialog with its reject ('Cancel') button; return their texts."""
        texts = self.dialogs()
        self.driver.execute_script(
            "document.querySelectorAll('.jp-Dialog .jp-mod-reject').forEach(b => b.click())")
        return texts

    def state(self, path: str) -> dict | None:
        """The open document ``path``: kernel status, unsaved changes, writable."""
        return self.driver.execute_script(_FIND + """
if (!widget) return null;
const s = widget.sessionContext;
return {kernel: s && s.session && s.session.kernel ? s.session.kernel.status : null,
        dirty: widget.context.model.dirty,
        writable: widget.context.contentsModel ? widget.context.contentsModel.writable : null,
        last_modified: widget.context.contentsModel ? widget.context.contentsModel.last_modified : null};
""", path)

    def cell_source(self, path: str, index: int) -> str | None:
        """The source of cell ``index`` of the open notebook ``path`` as the browser holds it."""
        return self.driver.execute_script(_FIND + """
if (!widget) return null;
return widget.content.widgets[arguments[1]].model.sharedModel.getSource();
""", path, index)

    # -- user actions -----------------------------------------------------------------------

    def open(self, path: str) -> None:
        """Open ``path`` (relative to the server root) in a tab, as a double click in the File
        browser does, and wait until its content is loaded."""
        error = self._run_async("""
jupyterapp.commands.execute('docmanager:open', {path: arguments[0]})
  .then(w => w.context.ready).then(() => done(null)).catch(e => done(String(e)));
""", path)
        if error:
            raise RuntimeError(f"JupyterLab could not open {path}: {error}\n{self.lab.log(3000)}")

    def wait_kernel_idle(self, path: str, timeout: float | None = None) -> None:
        self._wait_for(_FIND + """
const s = widget && widget.sessionContext;
return s && s.session && s.session.kernel && s.session.kernel.status === 'idle';
""", f"the kernel of {path} to be idle", path, timeout=timeout)

    def activate(self, path: str) -> None:
        self.driver.execute_script(_FIND + "jupyterapp.shell.activateById(widget.id);", path)
        time.sleep(0.3)

    def save_shortcut(self, path: str) -> None:
        """Bring ``path``'s tab to the front and press Ctrl+S (JupyterLab's save shortcut)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        self.activate(path)
        # focus the notebook (command mode), not a cell editor
        self.driver.execute_script(_FIND + "widget.content.node.focus();", path)
        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        time.sleep(1.0)

    def type_in_cell(self, path: str, index: int, text: str) -> None:
        """Click into code cell ``index`` of notebook ``path``, go to the end of its source and
        type ``text`` (a real key press per character)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        self.activate(path)
        editor = self.driver.execute_script(_FIND + """
const cell = widget.content.widgets[arguments[1]];
cell.node.scrollIntoView();
return cell.node.querySelector('.cm-content');
""", path, index)
        editor.click()
        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys(Keys.END).key_up(Keys.CONTROL) \
            .send_keys(text).perform()
        time.sleep(0.5)

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            self._profile.cleanup()


def _relative(root: Path, name: str) -> str:
    path = Path(name)
    path = path.resolve() if path.is_absolute() else (Path.cwd() / path).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise SystemExit(f"{name} is not inside --root {root}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="the folder JupyterLab serves (repository root)")
    parser.add_argument("notebooks", nargs="+", help="notebooks to open (paths inside --root)")
    parser.add_argument("--wait", type=float, default=DEFAULT_AUTOSAVE_S + 30,
                        help="seconds to keep them open once their kernels are idle "
                             f"(default {DEFAULT_AUTOSAVE_S + 30}: past the default autosave)")
    parser.add_argument("--autosave-interval", type=float, default=None,
                        help=f"seconds (default: JupyterLab's, {DEFAULT_AUTOSAVE_S})")
    parser.add_argument("--save", action="store_true",
                        help="also press Ctrl+S in each notebook once its kernel is idle")
    parser.add_argument("--direct", action="store_true",
                        help="start `jupyter lab` directly instead of `make lab`")
    args = parser.parse_args(argv)
    reason = missing_browser()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    root = Path(args.root).resolve()
    paths = [_relative(root, n) for n in args.notebooks]
    # the opened files and their Jupytext pairs (X.py beside X.ipynb: what dvc.yaml depends on)
    watched = paths + [p[:-len(".ipynb")] + ".py" for p in paths
                       if p.endswith(".ipynb") and (root / p).with_suffix(".py").exists()]
    before = file_digests(root / p for p in watched)
    with JupyterLab(root, autosave_interval=args.autosave_interval,
                    via_make=False if args.direct else None) as lab:
        print(f"JupyterLab {lab.base} serving {root}: {shlex.join(lab.command())}", flush=True)
        browser = LabBrowser(lab)
        try:
            for path in paths:
                browser.open(path)
                print(f"opened {path}", flush=True)
            for path in paths:
                browser.wait_kernel_idle(path)
                if args.save:
                    browser.save_shortcut(path)
                    for text in browser.dismiss_dialogs():
                        print(f"{path}: dialog: {' '.join(text.split())}", flush=True)
            print(f"kernels idle; waiting {args.wait:.0f} s "
                  f"(autosave every {args.autosave_interval or DEFAULT_AUTOSAVE_S:.0f} s)", flush=True)
            time.sleep(args.wait)
            for text in browser.dismiss_dialogs():
                print(f"dialog: {' '.join(text.split())}", flush=True)
            for path in paths:
                print(f"{path}: {browser.state(path)}", flush=True)
        finally:
            browser.quit()
    after = file_digests(root / p for p in watched)
    changed = [p for p in watched if before[str(root / p)] != after[str(root / p)]]
    print("bytes changed on disk: " + (", ".join(changed) if changed else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
