"""What the test files share: fake data, tiny params, the tiny study, and the background runs."""

import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from torch import nn

from transfer_study.bench.study import parse_assignment
from transfer_study.core import paths
from transfer_study.core.config import load_params
from transfer_study.core.params_file import deep_merge
from transfer_study.data.readers import read_cifar10
from transfer_study.data.splits import load_split, make_splits, save_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# What every training stage writes into metrics/train_<model>.json, at least.
TRAIN_KEYS = {
    "kept_val_loss",
    "kept_val_accuracy",
    "kept_epoch",
    "epochs",
    "train_seconds",
    "trainable_params",
    "total_params",
}
# Input statistics for building a network without data: CIFAR-10's shape, round mean and std.
STATS = {"shape": [3, 32, 32], "mean": (0.5,) * 3, "std": (0.25,) * 3}


# Fake data.


def fake_images(labels, rng):
    """uint8 N x 3 x 32 x 32 images whose colour depends on the class, so models can learn."""
    palette = rng.integers(30, 226, size=(len(CLASSES), 3))
    noise = rng.normal(0, 25, size=(len(labels), 3, 32, 32))
    return np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)


def pickled(obj, protocol=2):
    """`obj` pickled as the official CIFAR-10 files are: protocol 2, for Python 2 (any protocol
    reads; 2 cannot hold an empty array)."""
    return pickle.dumps(obj, protocol=protocol)


def _add_member(tar, name, payload):
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_cifar_archive(path, train_per_class=20, test_per_class=5, seed=0, skip=(), raw=None):
    """A CIFAR-10 python archive in the official layout: 5 train batches, a test batch, meta.

    `skip` leaves members out; `raw` maps member names to bytes written in their place.
    """
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(10), train_per_class))
    test_labels = rng.permutation(np.repeat(np.arange(10), test_per_class))
    train_images = fake_images(train_labels, np.random.default_rng(seed + 1))
    test_images = fake_images(test_labels, np.random.default_rng(seed + 1))
    batches = {
        f"data_batch_{i + 1}": part
        for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5))
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, idx in batches.items():
            if name not in skip:
                batch = {
                    b"batch_label": name.encode(),
                    b"labels": train_labels[idx].tolist(),
                    b"data": train_images[idx].reshape(len(idx), -1),
                }
                _add_member(tar, name, pickled(batch))
        if "test_batch" not in skip:
            batch = {
                b"labels": test_labels.tolist(),
                b"data": test_images.reshape(len(test_labels), -1),
            }
            _add_member(tar, "test_batch", pickled(batch))
        if "batches.meta" not in skip:
            meta = {b"label_names": [c.encode() for c in CLASSES]}
            _add_member(tar, "batches.meta", pickled(meta))
        for name, payload in (raw or {}).items():
            _add_member(tar, name, payload)
    return path


class RunsCode:
    """A pickle that would create the sentinel file when loaded."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def save_test_images(folder, count=3):
    """The first test images of the split in the working folder as PNG files (lossless), with
    the test split: (paths, split)."""
    test = load_split(paths.split_file("test"))
    image_paths = []
    for i in range(count):
        image_paths.append(folder / f"test{i}.png")
        Image.fromarray(test.images[i].transpose(1, 2, 0)).save(image_paths[-1])
    return image_paths, test


# Params.


def tiny_overrides(archive):
    """Params for a run of seconds: few images, small inputs, random weights, 2 epochs; featurize
    in bf16 whatever a probe would find, so that every run of the suite caches the same."""
    return {
        "data": {"url": str(archive), "md5": None, "train_size": 150, "test_size": 50},
        "train": {"batch_size": 32, "max_epochs": 2, "patience": 1},
        **{
            name: {"weights": "none", "image_size": size, "featurize_precision": "bf16"}
            for name, size in (
                ("vgg16", 32),
                ("inception", 75),
                ("lite0", 32),
                ("lite1", 32),
                ("lite2", 32),
            )
        },
    }


def params(archive, **overrides):
    """Loaded params: the repository's params.yaml, tiny_overrides(archive), then `overrides`."""
    return load_params(f"{REPO}/params.yaml", deep_merge(tiny_overrides(archive), overrides))


def only(*names):
    """The `models` switches of params.yaml with just `names` in the study."""
    with open(os.path.join(REPO, "params.yaml")) as file:
        declared = yaml.safe_load(file)["models"]
    return {name: name in names for name in declared}


def write_params(path, overrides):
    """params.yaml of the repository with nested `overrides` applied."""
    with open(os.path.join(REPO, "params.yaml")) as file:
        raw = yaml.safe_load(file)
    with open(path, "w") as file:
        yaml.safe_dump(deep_merge(raw, overrides), file, sort_keys=False)


# The tiny study, trained in this process.

# The session's study, on top of tiny_overrides: the MLP and VGG16 (random weights, 32 px) in
# it, the MLP trained for 4 epochs (enough to learn the fake classes well), VGG16's head for 2.
STUDY = {"models": only("mlp", "vgg16"), "mlp": {"train": {"max_epochs": 4, "patience": 4}}}


def run_study(folder, archive):
    """The tiny study, in `folder`, as its stages would run it: the split (seeded, capped at
    data.train_size and data.test_size: 120 train / 30 val / 50 test images), VGG16's features
    of every split and of the mirrored train and test images, the MLP and VGG16's head trained,
    both evaluated. Returns (params, {model: the metrics train_model returned})."""
    from transfer_study.evaluate import evaluate_models
    from transfer_study.featurize import featurize_model
    from transfer_study.train.fit import train_model

    p = params(archive, **STUDY)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        train, test = read_cifar10(archive)
        data = p.data
        splits = make_splits(
            train, test, data.val_fraction, p.seed, data.train_size, data.test_size
        )
        for name, split in splits.items():
            save_split(split, paths.split_file(name))
        featurize_model("vgg16", p.model("vgg16"), hflip=True)
        metrics = {name: train_model(name, p) for name in p.models}
        evaluate_models(p.models)
    return p, metrics


@dataclass(frozen=True)
class Study:
    root: Path  # the project folder holding the study's outputs
    archive: Path  # the fake CIFAR-10 archive it was split from
    params: object  # the params it ran with
    metrics: dict  # model -> what train_model returned

    def params_with(self, **overrides):
        """The study's params with nested `overrides`."""
        return params(self.archive, **deep_merge(STUDY, overrides))


def train_outputs(name):
    """The files a training stage writes: the model, its history and its metrics."""
    return paths.model_file(name), paths.history_file(name), paths.train_metrics(name)


def leftovers(workdir):
    """Temporary files of atomic writes (.<name>.tmp<pid><suffix>) anywhere in the project."""
    return list(workdir.rglob(".*.tmp*"))


def linear_widths(net):
    """(in, out) features of each linear layer of `net`, in order."""
    return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]


# The commands of docs/results.md.


def documented_commands(heading):
    """{label: command} of the `dvc exp run` commands in the bash blocks of docs/results.md's
    section `heading`, continuation lines joined. Each command follows its `# label` line: a
    command without one, a label without its command or a label given twice fails the test."""
    results = Path(REPO, "docs", "results.md").read_text()
    assert f"\n## {heading}\n" in results, f"docs/results.md: no section {heading!r}"
    section = results.split(f"\n## {heading}\n")[1].split("\n## ")[0]
    commands, label = {}, None
    for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            if line.startswith("dvc exp run"):
                assert label, f"docs/results.md, {heading}: no '# label' line above {line!r}"
                commands[label], label = line, None
                continue
            assert label is None, f"docs/results.md, {heading}: '# {label}' has no command"
            if re.fullmatch(r"# \w+", line):
                label = line[2:]
                assert label not in commands, f"docs/results.md, {heading}: '# {label}' twice"
        assert label is None, f"docs/results.md, {heading}: '# {label}' has no command"
    return commands


def grid(command):
    """Every params override a command sets: one per combination of a queued grid's values,
    each `-S key=value` parsed as DVC parses it (the study timer's parser)."""
    combos = [{}]
    args = shlex.split(command)
    for flag, assignment in zip(args, args[1:]):
        if flag != "-S":
            continue
        key, value = assignment.split("=", 1)
        choices = (
            value.split(",") if "--queue" in args and not value.startswith(("[", "{")) else [value]
        )
        nested = [parse_assignment(f"{key}={choice}") for choice in choices]
        combos = [deep_merge(c, n) for c in combos for n in nested]
    return combos


# Projects run by DVC in processes.

DECLARED = ["mlp", "vgg16", "inception", "lite0", "lite1", "lite2", "resnet50"]  # dvc.yaml's
ALL_STAGES = [
    "download",
    "split",
    "evaluate",
    "report",
    *(f"train_{m}" for m in DECLARED),
    *(f"featurize_{m}" for m in DECLARED[1:]),
]
# What a project needs of the repository to run its pipeline.
COPIED = [
    "dvc.yaml",
    "params.yaml",
    "stages",
    "src",
    ".dvc/config",
    ".dvc/plots",
    "data/images",
    ".dvc/.gitignore",
    ".gitignore",
    "pyproject.toml",
]


def run(root, *args):
    """The output of command `args` run in project `root` with its own code; it must succeed."""
    env = {
        **os.environ,
        "PYTHONPATH": str(root / "src"),
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
    }
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def stages_run(output):
    """The stages DVC's `output` says it ran, sorted."""
    return sorted(re.findall(r"Running stage '(\w+)'", output))


def committed_study(root):
    """The repository's pipeline and code in `root`, with tiny params, committed to git."""
    for name in COPIED:
        source, target = os.path.join(REPO, name), root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(source):
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg*"))
        else:
            shutil.copy(source, target)
    (root.parent / "mirror").mkdir()
    archive = write_cifar_archive(root.parent / "mirror" / "cifar.tar.gz")
    write_params(root / "params.yaml", tiny_overrides(archive))
    run(root, "git", "init", "-q")
    # dvc exp commits experiments: it needs an identity even where git has no global one.
    run(root, "git", "config", "user.name", "test")
    run(root, "git", "config", "user.email", "test@example.com")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "tiny study")
    return root


def _dvc_tmp(folder, names):
    return ["tmp"] if Path(folder).name == ".dvc" else []  # DVC's locks and scratch files


def copy_project(source, target):
    """A copy of a project folder, git history and DVC cache included."""
    shutil.copytree(source, target, symlinks=True, ignore=_dvc_tmp)
    return target


def plotted_models(project):
    """{plot title: the models it shows} of `dvc plots show --json`; images by file name."""
    shown = json.loads(run(project, "dvc", "plots", "show", "--json"))["data"]
    models = {}
    for title, renderers in shown.items():
        for renderer in renderers:
            if renderer["type"] == "vega":
                models[title] = {row["model"] for row in renderer["content"]["data"]["values"]}
            else:
                models.setdefault("images", set()).add(title.rsplit("/", 1)[-1])
    return models


# Background runs. A test module may list in RUNS functions that do their work in processes
# (dvc, the stage scripts, the study timer) and return what its tests check, as JSON (paths
# become strings). Before the first test, one worker process (this file, run as a script) runs
# those the selected tests need, two at a time, while the other tests run (conftest's
# background_runs); each run's result is the fixture named after it (background_fixtures). The
# tests that wait for one go last. A run marked @needs(name) reads that one's result with
# runs.wait(name).


def needs(*names):
    """Marks a run that reads the results of the runs `names` (listed before it in RUNS)."""

    def mark(function):
        function.needs = names
        return function

    return mark


def background_fixtures(runs):
    """{attribute: fixture} for a module's RUNS: each fixture named after its run, holding the
    run's result (globals().update(background_fixtures(RUNS)) defines them)."""

    def fixture_of(name):
        @pytest.fixture(name=name)
        def result(background_runs):
            return background_runs.result(name)

        return result

    return {f"result_of_{run.__name__}": fixture_of(run.__name__) for run in runs}


class Runs:
    """In the worker: each run in a pool of two threads, every one started at once, each run's
    result written to <base>/<name>.json, or its traceback to <base>/<name>.error."""

    def __init__(self, base, functions):
        self.base = base
        self.lock = threading.Lock()
        self.once_done = {}
        self.futures = {}
        with ThreadPoolExecutor(max_workers=2) as pool:
            for function in functions:  # each after those it needs
                self.futures[function.__name__] = pool.submit(self._record, function)

    def _record(self, function):
        name = function.__name__
        try:
            text, suffix = json.dumps(function(self), default=str), ".json"
        except BaseException:
            text, suffix = traceback.format_exc(), ".error"
        partial = self.base / f".{name}{suffix}"
        partial.write_text(text)
        partial.rename(self.base / f"{name}{suffix}")  # whole, or not there
        if suffix == ".error":
            raise RuntimeError(f"{name} failed")
        return json.loads(text)

    def folder(self, name):
        """A new folder of the worker's, `name` unique among the runs."""
        folder = self.base / name
        folder.mkdir()
        return folder

    def wait(self, name):
        """The result of run `name` (one of this run's needs), once it has finished."""
        return self.futures[name].result()

    def once(self, name, make):
        """make(), called by the first run that asks for `name`; the others get its value."""
        with self.lock:
            if name not in self.once_done:
                self.once_done[name] = make()
            return self.once_done[name]


class Worker:
    """The worker process, from the tests' side."""

    def __init__(self, base, runs):
        self.base = base
        self.log = open(base / "worker.log", "w")
        specs = [f"{run.__module__}:{run.__name__}" for run in runs]
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(base), *specs],
            cwd=Path(__file__).parent,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped with its processes, if the tests stop early
        )

    def result(self, name, seconds=1800):
        done, failed = self.base / f"{name}.json", self.base / f"{name}.error"
        deadline = time.monotonic() + seconds
        while not done.exists():
            if failed.exists():
                pytest.fail(f"{name}:\n{failed.read_text()}", pytrace=False)
            if self.process.poll() is not None and not done.exists():
                log = (self.base / "worker.log").read_text()[-3000:]
                pytest.fail(f"the worker ended without {name}:\n{log}", pytrace=False)
            assert time.monotonic() < deadline, f"{name}: still running"
            time.sleep(0.2)
        return json.loads(done.read_text())

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait()
        self.log.close()


# The runs shared by several test modules, each in a folder of its own.


def committed(runs):
    """The committed study, in a folder of the first run that asks for it."""
    return runs.once("committed", lambda: committed_study(runs.folder("committed") / "project"))


def reproduced(runs):
    """`dvc repro` of the committed study, then its results committed: (project, output)."""
    root = copy_project(committed(runs), runs.folder("reproduced") / "project")
    output = run(root, "dvc", "repro")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "results")
    return root, output


def finished(runs, name):
    """A copy of the reproduced study (its results committed) in a new folder `name`."""
    source, _ = runs.wait("reproduced")
    return copy_project(Path(source), runs.folder(name) / "project")


if __name__ == "__main__":  # the worker: python helpers.py BASE MODULE:RUN...
    import importlib

    functions = []
    for spec in sys.argv[2:]:
        module, name = spec.split(":")
        functions.append(getattr(importlib.import_module(module), name))
    Runs(Path(sys.argv[1]), functions)
