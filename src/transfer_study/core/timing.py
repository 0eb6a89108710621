"""Where a stage's time goes, for the study timer: process start, first batch, end, images.

Only when TRANSFER_STUDY_TIMINGS names a file (the timer sets it); otherwise each call is a
dictionary lookup. Each stage appends one JSON line there as it exits. Under train.strategy
ddp_spawn the batches run in spawned processes, which write nothing: the record then shows
the launching process's times, without a first batch or images.
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
    """`count` more images went through the stage's main work, all ranks together (for images
    per second)."""
    _record["images"] += count


def stage_name(argv):
    """dvc.yaml's name of the stage run as `python stages/<kind>.py [model]`."""
    return "_".join([Path(argv[0]).stem, *argv[1:2]])


def process_start():
    """When this process started, as time.time() seconds (interpreter start-up included): its
    age from /proc (10 ms ticks), which psutil's create_time blurs by rounding the boot time
    to whole seconds."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # no /proc (macOS): whole-second boot time
        import psutil

        return psutil.Process().create_time()


def write_record():
    """Append this stage's times (seconds since the epoch) to the timings file, if asked for.
    Under DDP or torchrun, the first process alone calls it."""
    path = os.environ.get(ENV)
    if not path:
        return
    record = {
        "stage": stage_name(sys.argv),
        "process_start": process_start(),
        "work_start": _record.get("work_start", _record.get("main_start")),
        "end": time.time(),
        "images": _record["images"],
    }
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
