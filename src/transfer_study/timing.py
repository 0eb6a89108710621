"""Where a stage's time goes, for the study timer: process start, first batch, end, images.

Only when TRANSFER_STUDY_TIMINGS names a file (the timer sets it); otherwise each call is a
dictionary lookup. Each stage appends one JSON line there as it exits.
"""

import json
import os
import sys
import time
from pathlib import Path

ENV = "TRANSFER_STUDY_TIMINGS"
_record = {"images": 0}


def main_starts():
    """The stage's main() begins: its module-level imports are done."""
    _record["main_start"] = time.time()


def work_starts():
    """The stage's first batch begins now (later calls change nothing). Stages without batches
    (download, split, report) count from main_starts()."""
    _record.setdefault("work_start", time.time())


def count_images(count):
    """`count` more images went through the stage's main work (for images per second)."""
    _record["images"] += count


def stage_name(argv):
    """dvc.yaml's name of the stage run as `python stages/<kind>.py [model]`."""
    return "_".join([Path(argv[0]).stem, *argv[1:2]])


def write_record():
    """Append this stage's times (seconds since the epoch) to the timings file, if asked for."""
    path = os.environ.get(ENV)
    if not path:
        return
    import psutil  # only when timing: when this process started, interpreter start-up included

    record = {
        "stage": stage_name(sys.argv),
        "process_start": psutil.Process().create_time(),
        "work_start": _record.get("work_start", _record.get("main_start")),
        "end": time.time(),
        "images": _record["images"],
    }
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
