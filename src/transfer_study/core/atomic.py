"""Outputs are written whole or not at all: write to a temporary name, then rename."""

import contextlib
import json
import os
import shutil
from pathlib import Path

from transfer_study.core.stage import stop_if_signalled


def _temporary(path):
    """This process's temporary name beside `path`: hidden, and found by its `.tmp` (tests look
    for leftovers with it). The suffix stays, so that libraries that look at it (np.save,
    savefig) keep working."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        stop_if_signalled()  # a stop signal lost on its way out still keeps this output out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_paths(*paths):
    """atomic_path for several outputs that make one set: none is renamed into place unless the
    block writes them all."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


class Rewritten:
    """A folder rewritten in place as one set, where its readers look while it is written
    (dvc exp show follows DVCLive's folder during training): `begin` moves the old folder aside;
    a block run with the object as context manager then drops it if it succeeds, or puts it
    back byte for byte if it fails (an exception, SIGINT, SIGTERM), removing what was written
    since. The block calls `begin` (only the process that writes the folder does: one rank, or
    the training process Lightning spawns). A process killed with SIGKILL runs no cleanup: the
    old folder is then left beside as .<name>.tmp<pid>, to rename back by hand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        # Named by the process that makes the object, which ends the block, whoever begins.
        self.aside = _temporary(self.folder)

    def begin(self):
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        if self.folder.exists():
            os.replace(self.folder, self.aside)
        else:
            self.aside.mkdir()  # an empty folder aside: there was none (or an empty one)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if not self.aside.exists():  # not begun: nothing of the folder was touched
            return
        if kind is None:
            shutil.rmtree(self.aside)
            return
        if self.folder.exists():
            shutil.rmtree(self.folder)
        if any(self.aside.iterdir()):
            os.replace(self.aside, self.folder)
        else:
            self.aside.rmdir()


def json_text(data):
    """The text of every JSON file the project writes: indented, keys in their order. NaN and
    infinity raise ValueError: JSON has no such numbers (Python's NaN is not JSON, DVC's parser
    refuses it), and a metric that is one is the caller's to report."""
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(path, data):
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data))


def write_text(path, text):
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
