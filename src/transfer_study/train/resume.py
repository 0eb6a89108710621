"""Checkpoints of an unfinished run: its fingerprint, whether to resume, when to remove them."""

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import sys

import numpy as np

from transfer_study.core import paths
from transfer_study.core.stage import is_first_process
from transfer_study.nn.backbones import UnreadableTensors, load_tensors


def run_key_of(section, seed, arrays):
    """Fingerprint of everything a run's result depends on, but train.resume itself."""
    config = dataclasses.asdict(section)
    config["train"].pop("resume")
    digest = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def checkpoint_folder(name, run_key, resume):
    """(checkpoint folder, checkpoint to resume from or None, and for a fresh run the function
    that empties the folder for it, else None). Only reads: rank 0 of a fresh run calls that
    function once every process has joined (rendezvous.py), so that a run whose peers never
    come writes nothing."""
    folder = paths.checkpoint_dir(name)
    key_file, last = folder / "run_key", folder / "last.ckpt"
    same_run = resume and last.is_file() and _read_key(key_file) == run_key
    if same_run and _resumable(last):
        print(f"{name}: resuming from {last}", file=sys.stderr)
        return folder, str(last), None
    note = None
    if same_run:
        note = f"{name}: {last} is damaged or not a checkpoint; starting over"
    elif resume and last.exists():
        note = f"{name}: {last} is from another configuration; starting over"
    return folder, None, functools.partial(_start_over, folder, run_key, note)


def _start_over(folder, run_key, note):
    """Empty the checkpoint folder for a fresh run, keyed by its run key."""
    if note:
        print(note, file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "run_key").write_text(run_key)


@contextlib.contextmanager
def kept_while_resumable(folder, trainer):
    """Training and its outputs in the block. The checkpoint folder is removed when the block
    ends, unless training stopped before its end (an exception, SIGINT, SIGTERM) with an epoch
    that train.resume continues from (last.ckpt). A run refused after training finished (its
    val loss never finite) would end the same way resumed. The first process removes it: it
    prepared the folder."""
    try:
        yield
    except BaseException:
        if not trainer.state.finished and (folder / "last.ckpt").is_file():
            raise
        _remove(folder)
        raise
    _remove(folder)


def _remove(folder):
    if is_first_process() and folder.exists():
        shutil.rmtree(folder)


def _read_key(path):
    """The run key saved beside a checkpoint (64 hex digits; at most 100 bytes are read)."""
    try:
        with open(path, "rb") as file:
            return file.read(100).decode("ascii", errors="replace")
    except OSError:
        return None


def _resumable(path):
    """Whether a checkpoint loads whole as tensors and plain data (weights_only: nothing in a
    tampered file runs) and holds what a resumed run needs."""
    try:
        state = load_tensors(path)
    except UnreadableTensors:  # damaged, truncated or tampered
        return False
    return isinstance(state, dict) and {"state_dict", "rng_state", "loops"} <= state.keys()
