"""The study timer: `dvc repro` of the whole pipeline in a scratch copy, timed stage by stage.

python -m transfer_study.bench study [--archive PATH] [-S key=value ...] [--rerun key=value ...]

Each stage reports when its process started, when its first batch began and when it ended
(core/timing.py); the table splits its wall time into the fixed cost (process start, imports, CUDA
and model set-up: everything before the first batch) and the work. The last line is JSON.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from transfer_study.core import paths, timing
from transfer_study.core.config import parse_params
from transfer_study.core.params_file import deep_merge, read_params, yaml_problem
from transfer_study.core.pipeline import check_stages
from transfer_study.core.stage import UserError, exit_on_user_error, shown

COLUMNS = ("stage", "wall s", "fixed s", "work s", "images/s")


def parse_assignment(text, option="-S"):
    """`a.b=value` as `dvc exp run -S` reads it (the value as YAML; a leading `++`, which adds a
    key params.yaml lacks, changes nothing here) -> {"a": {"b": value}}. `option` names the
    command-line option it came from, in errors."""
    key, sep, value = text.partition("=")
    key = key.removeprefix("++")
    if not sep or not key:
        raise UserError(f"{option} {shown(text)}: expected key=value, e.g. {option} train.lr=1e-4")
    try:
        nested = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise UserError(
            f"{option} {shown(text)}: the value is not YAML ({yaml_problem(error)})"
        ) from None
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def run_tool(command, cwd, **kwargs):
    """subprocess.run of git or dvc; not installed: one line."""
    try:
        return subprocess.run(command, cwd=cwd, **kwargs)
    except FileNotFoundError:
        raise UserError(f"{command[0]} is not installed (or not on PATH)") from None


def copy_project(source, target):
    """The project's files as git sees them (tracked, and new files not ignored) in `target`,
    committed there: no data, cache or outputs come along, so every stage runs."""
    listed = run_tool(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
    )
    if listed.returncode != 0:
        raise UserError(f"{source} is not a git checkout of this project: run the timer there")
    for name in filter(None, listed.stdout.decode().split("\0")):
        origin = source / name
        if origin.is_file():  # a tracked file deleted in the workspace stays out
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / name)
    git = ["git", "-c", "user.name=timer", "-c", "user.email=timer@localhost"]
    git += ["-c", "commit.gpgsign=false"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "study timer"]):
        done = run_tool([*git, *command], cwd=target, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"git {command[0]} failed in the scratch copy: {done.stderr.strip()}")


def validated(raw, project):
    """`raw` params, checked as the project's stages will check them (a bad value stops here,
    with the stages' one line)."""
    check_stages(parse_params(raw), project / "dvc.yaml")
    return raw


def write_params(project, raw):
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def time_repro(project, force):
    """Run `dvc repro` in `project`: (wall seconds, one timing record per stage that ran)."""
    records = project / ".timings.jsonl"
    records.unlink(missing_ok=True)
    # The copy's own code runs, whatever version of the package is installed.
    path = os.pathsep.join(filter(None, [str(project / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, timing.ENV: str(records), "DVC_NO_ANALYTICS": "1", "PYTHONPATH": path}
    start = time.time()
    try:
        # Its own process group: on Ctrl+C (or SIGTERM) the timer interrupts dvc and the stage it
        # runs together, and waits for both before it removes the copy they write in.
        process = subprocess.Popen(
            ["dvc", "repro", *(["--force"] if force else [])],
            cwd=project,
            env=env,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise UserError("dvc is not installed (or not on PATH)") from None
    try:
        code = process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGINT)
        process.wait()
        raise
    seconds = time.time() - start
    if code != 0:
        raise ReproFailed(f"dvc repro failed (exit {code}) in {project} (kept); see above")
    lines = records.read_text().splitlines() if records.exists() else []
    return seconds, [json.loads(line) for line in lines]


class ReproFailed(UserError):
    """dvc repro failed in the scratch copy, which is kept for a look."""


def breakdown(records):
    """stage -> {seconds, startup_seconds, work_seconds, images_per_second}. The fixed cost
    (startup) runs to the first batch; in stages without batches (download, split, report, a
    left-out model's), to the start of main()."""
    stages = {}
    for record in records:
        wall = record["end"] - record["process_start"]
        startup = record["work_start"] - record["process_start"]
        work = record["end"] - record["work_start"]
        stages[record["stage"]] = {
            "seconds": round(wall, 2),
            "startup_seconds": round(startup, 2),
            "work_seconds": round(work, 2),
            "images_per_second": round(record["images"] / work, 1) if record["images"] else None,
        }
    return stages


def accuracies_on_test(project):
    """Each model's test accuracy in the copy's metrics/evaluate.json (printed, and returned)."""
    scores = json.loads((project / paths.EVALUATE_METRICS).read_text())
    accuracy = {name: result["test_accuracy"] for name, result in scores.items()}
    print("test accuracy: " + ", ".join(f"{name} {a:.2%}" for name, a in accuracy.items()))
    return accuracy


def print_table(title, total, stages):
    """One row per stage, then the stages' sums, DVC's own time between them and the wall."""

    def row(name, *seconds, rate=None):
        cells = [f"{x:.2f}" if x is not None else "" for x in seconds]
        cells += [""] * (3 - len(cells))
        return (name, *cells, f"{rate:,.0f}" if rate else "-" if seconds[1:] else "")

    keys = ("seconds", "startup_seconds", "work_seconds")
    rows = [
        row(name, *(s[k] for k in keys), rate=s["images_per_second"]) for name, s in stages.items()
    ]
    sums = [sum(s[k] for s in stages.values()) for k in keys]
    rows += [
        row("all stages", *sums),
        row("dvc between stages", total - sums[0]),
        row("dvc repro, wall", total),
    ]
    widths = [max(len(r[i]) for r in (COLUMNS, *rows)) for i in range(len(COLUMNS))]
    print(f"\n{title}")
    for cells in (COLUMNS, *rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
        )


def device_name():
    import torch  # only here: the timer itself starts no training

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m transfer_study.bench study", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--archive", type=Path, help="a CIFAR-10 python archive, as data.url (md5 unchecked)"
    )
    parser.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml value, as dvc exp run -S",
    )
    parser.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="after the study, change this and time dvc repro again (e.g. train.lr=1e-4)",
    )
    parser.add_argument(
        "--project", type=Path, default=Path.cwd(), help="the project to copy (default: here)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch copy (its path is printed)"
    )
    args = parser.parse_args(argv)
    overrides = {}
    for text in args.set:
        overrides = deep_merge(overrides, parse_assignment(text))
    if args.archive:
        if not args.archive.is_file():
            raise UserError(f"--archive {args.archive}: no such file")
        overrides = deep_merge(
            overrides, {"data": {"url": str(args.archive.resolve()), "md5": None}}
        )
    changes = {}
    for text in args.rerun:
        changes = deep_merge(changes, parse_assignment(text, "--rerun"))
    project = args.project.resolve()
    if not (project / "dvc.yaml").is_file():
        raise UserError(
            f"{project} has no dvc.yaml: run the timer in the project (or pass --project)"
        )
    # Every value checked before anything is copied or run: a typo in --rerun would otherwise
    # surface only after the whole study.
    study = validated(deep_merge(read_params(project / "params.yaml"), overrides), project)
    after_change = validated(deep_merge(study, changes), project)
    # Beside the project, so that a relative path leaving it (data.path=../cifar10-train)
    # names the same file from the copy.
    scratch = Path(tempfile.mkdtemp(prefix=".study-timer-", dir=project.parent))
    keep = args.keep
    try:
        copy_project(project, scratch)
        write_params(scratch, study)
        print(f"scratch copy: {scratch}", file=sys.stderr)
        total, records = time_repro(scratch, force=True)
        stages = breakdown(records)
        summary = {"total_seconds": round(total, 2), "device": device_name(), "stages": stages}
        print_table(f"dvc repro, every stage ({summary['device']})", total, stages)
        summary["test_accuracy"] = accuracies_on_test(scratch)
        if args.rerun:
            write_params(scratch, after_change)
            total, records = time_repro(scratch, force=False)
            rerun = breakdown(records)
            print_table(f"dvc repro after {' '.join(args.rerun)}", total, rerun)
            summary["rerun"] = {
                "total_seconds": round(total, 2),
                "stages": rerun,
                "test_accuracy": accuracies_on_test(scratch),
            }
    except ReproFailed:
        keep = True
        raise
    except KeyboardInterrupt:
        print("interrupted: the timer stopped; the project itself is unchanged", file=sys.stderr)
        sys.exit(130)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(summary))
    return summary
