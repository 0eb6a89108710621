"""DVC experiments driven from Python: commands with their output streamed, -S overrides, the
names of HEAD's experiments, and the untracked results an experiment's copy of the project
needs. The notebook and the search both run the study through these."""

import codecs
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from transfer_study.core.progress import VARIABLE as PROGRESS_VARIABLE

DVC = [sys.executable, "-m", "dvc"]  # the DVC of this Python's environment


def stream(args, keep=False):
    """Run `dvc ARGS` in the project, its output streamed as it comes: progress bars redraw in
    place, as a terminal or a notebook renders carriage returns. Returns (exit status, what DVC
    printed if `keep`, else ""). An interrupt (Ctrl+C, a notebook's stop button, SIGTERM turned
    into KeyboardInterrupt) is passed on to DVC, which is waited for: it stops its stage and
    cleans up before this returns."""
    command = [*DVC, *map(str, args)]
    env = {**os.environ, PROGRESS_VARIABLE: "bar", "PYTHONUNBUFFERED": "1"}
    printed = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    ) as run:
        try:
            while chunk := run.stdout.read1(65536):
                text = decoder.decode(chunk)
                if keep:
                    printed.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            run.send_signal(signal.SIGINT)
            run.wait()
            raise
    return run.returncode, "".join(printed)


def overrides(values):
    """{"train.lr": 1e-4, "++lite0.train.lr": 0.01, ...} as dvc exp run's -S arguments, each
    value written in the override grammar DVC reads (true, null, [512, 256], {mlp: true})."""
    return [arg for key, value in values.items() for arg in ("-S", f"{key}={_flow(value)}")]


def _flow(value):
    """A value as an override: strings quoted (a path may hold a comma, which would otherwise
    make a grid), mappings and lists in flow style, the rest as JSON writes it."""
    if isinstance(value, str):
        quote = "'" if "'" not in value else '"'
        return f"{quote}{value}{quote}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_flow, value)) + "]"
    return json.dumps(value)


def flat_params(tree, prefix=""):
    """{"train.lr": 0.001, ...}: nested params under the dotted keys -S takes, down to each
    value (a list, or an empty mapping such as `lite0.train: {}`, is one)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flat_params(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stage_definitions(dvc_yaml="dvc.yaml"):
    """dvc.yaml's stages: name -> what the stage declares (cmd, deps, params, outs)."""
    return yaml.safe_load(Path(dvc_yaml).read_text())["stages"]


def experiment_names():
    """The names of HEAD's experiments (dvc exp list)."""
    command = [*DVC, "exp", "list", "--name-only"]
    return subprocess.run(command, capture_output=True, text=True).stdout.split()


def copied_results():
    """--copy-paths arguments for dvc.lock and the outputs that dvc.yaml leaves to git
    (cache: false), where git does not track them yet, as in a fresh clone. An experiment run
    in a copy (--queue, --temp) starts from git's view of the workspace: without them, every
    stage whose lock entry or output is missing, featurize included, would run again."""
    uncached = [
        path
        for stage in stage_definitions().values()
        for out in stage.get("outs", [])
        if isinstance(out, dict)
        for path, options in out.items()
        if not (options or {}).get("cache", True)
    ]
    wanted = ["dvc.lock", *uncached]
    # --directory: a folder git knows nothing of is one entry (dvclive/), copied whole: DVC's
    # copy makes no parent folder for a path inside it.
    command = ["git", "ls-files", "--others", "--exclude-standard", "--directory"]
    listed = subprocess.run(command, capture_output=True, text=True).stdout.split()
    untracked = [entry.rstrip("/") for entry in listed if any(_holds(entry, p) for p in wanted)]
    return [arg for path in untracked for arg in ("--copy-paths", path)]


def _holds(entry, path):
    """Whether git's untracked `entry` (a folder ends with /) is `path`, lies inside it, or is a
    folder that holds it."""
    return (
        entry.rstrip("/") == path
        or entry.startswith(f"{path}/")
        or (entry.endswith("/") and path.startswith(entry))
    )
