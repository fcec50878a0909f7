# Jupyter server configuration for `make lab` (passed with --config; Jupyter does not read it
# otherwise). `c` is the config object Jupyter hands to this file.
#
# The executed copies of the stage notebooks (results/notebooks/*.ipynb, DVC outs) are written
# read-only (mode 0444) so that viewing them in JupyterLab cannot change them. A process running
# as root may write read-only files, and JupyterLab's server as root reports them as writable, so
# Ctrl+S (or an autosave) would overwrite the copy and `dvc status` would report the stage
# changed. This hook refuses to save over any file without write permission bits, for every
# user; JupyterLab shows the refusal in a "File Save Error" dialog.
import os
import warnings

from tornado.web import HTTPError

# Jupyter applies this file's settings to the contents manager more than once, and warns each
# time the hook is set over itself.
warnings.filterwarnings("ignore", message="Overriding existing pre_save_hook")


def refuse_saving_read_only_files(model, path, contents_manager, **kwargs):
    os_path = contents_manager._get_os_path(path)
    if os.path.isfile(os_path) and not os.stat(os_path).st_mode & 0o222:
        raise HTTPError(
            403, f"{path} is read-only (an executed notebook written by `dvc repro`): use "
                 f"File > Save Notebook As... to keep a copy of your changes")


c.ContentsManager.pre_save_hook = refuse_saving_read_only_files  # noqa: F821
