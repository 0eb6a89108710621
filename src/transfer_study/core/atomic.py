"""Outputs are written whole or not at all: write to a temporary name, then rename."""

import contextlib
import json
import os
from pathlib import Path

from transfer_study.core.stage import stop_if_signalled


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix so that libraries that look at it (np.save, savefig) keep working.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
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
