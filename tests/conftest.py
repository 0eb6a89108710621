"""Shared fixtures: fake CIFAR-10 archives written the official way, tiny params, one tiny
study trained once per session for the tests that only read its results, and the background
runs (end-to-end runs in processes, started before the first test)."""

import os

# Runs in the background share the cores with the tests: OpenMP threads that spin while they
# wait would burn the time another process needs, and on tiny batches a second thread costs
# more than it saves (a train_lite0 stage of the tiny study: 11.3 CPU seconds with 2 threads,
# 7.7 with 1). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy
import dataclasses
import io
import json
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from transfer_study.core import paths
from transfer_study.core.config import deep_merge, load_params
from transfer_study.data.splits import make_splits, save_split
from transfer_study.split import read_cifar10

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
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def fake_images(labels, rng):
    """uint8 N x 3 x 32 x 32 images whose colour depends on the class, so models can learn."""
    palette = rng.integers(30, 226, size=(len(CLASSES), 3))
    noise = rng.normal(0, 25, size=(len(labels), 3, 32, 32))
    return np.clip(palette[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)


def _pickled(obj):
    return pickle.dumps(obj, protocol=2)  # what the official Python 2 files use


def _add(tar, name, payload):
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
                _add(
                    tar,
                    name,
                    _pickled(
                        {
                            b"batch_label": name.encode(),
                            b"labels": train_labels[idx].tolist(),
                            b"data": train_images[idx].reshape(len(idx), -1),
                        }
                    ),
                )
        if "test_batch" not in skip:
            _add(
                tar,
                "test_batch",
                _pickled(
                    {
                        b"labels": test_labels.tolist(),
                        b"data": test_images.reshape(len(test_labels), -1),
                    }
                ),
            )
        if "batches.meta" not in skip:
            _add(tar, "batches.meta", _pickled({b"label_names": [c.encode() for c in CLASSES]}))
        for name, payload in (raw or {}).items():
            _add(tar, name, payload)
    return path


class RunsCode:
    """A pickle that would create the sentinel file when loaded."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def tiny_overrides(archive):
    """Params for a run of seconds: few images, small inputs, random weights, 2 epochs."""
    return {
        "data": {"url": str(archive), "md5": None, "train_size": 150, "test_size": 50},
        "train": {"batch_size": 32, "max_epochs": 2, "patience": 1},
        "vgg16": {"weights": "none", "image_size": 32},
        "inception": {"weights": "none", "image_size": 75},
        "lite0": {"weights": "none", "image_size": 32},
        "lite1": {"weights": "none", "image_size": 32},
        "lite2": {"weights": "none", "image_size": 32},
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


@pytest.fixture
def archive(tmp_path):
    return write_cifar_archive(tmp_path / "cifar.tar.gz")


@pytest.fixture
def workdir(archive, tmp_path, monkeypatch):
    """A project folder with the split stage's outputs, as the later stages find them."""
    monkeypatch.chdir(tmp_path)
    train, test = read_cifar10(archive)
    for name, split in make_splits(train, test, 0.2, seed=0).items():
        save_split(split, paths.split_file(name))
    return tmp_path


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


@dataclasses.dataclass(frozen=True)
class Study:
    root: Path  # the project folder holding the study's outputs
    archive: Path  # the fake CIFAR-10 archive it was split from
    params: object  # the params it ran with
    metrics: dict  # model -> what train_model returned

    def params_with(self, **overrides):
        """The study's params with nested `overrides`."""
        return params(self.archive, **deep_merge(STUDY, overrides))


@pytest.fixture(scope="session")
def trained_study(tmp_path_factory):
    """The tiny study, run once per session. Read it only: tests that write take `study`."""
    archive = write_cifar_archive(tmp_path_factory.mktemp("study_archive") / "cifar.tar.gz")
    root = tmp_path_factory.mktemp("study")
    p, metrics = run_study(root, archive)
    return Study(root, archive, p, metrics)


@pytest.fixture
def study(trained_study, tmp_path, monkeypatch):
    """A copy of the session's tiny study in tmp_path, the working folder: free to change."""
    shutil.copytree(trained_study.root, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return dataclasses.replace(
        trained_study, root=tmp_path, metrics=copy.deepcopy(trained_study.metrics)
    )


# Background runs. A test module may list in RUNS functions that do their work in processes
# (dvc, the stage scripts, the study timer) and return what its tests check, as JSON (paths
# become strings). Before the first test, one worker process (this file, run as a script) runs
# those the selected tests need, two at a time, while the other tests run here; each run's
# result is the fixture named after it (see background_fixtures). The tests that wait for one
# go last. A run marked @needs(name) reads that one's result with runs.wait(name).


def needs(*names):
    """Marks a run that reads the results of the runs `names` (listed before it in RUNS)."""

    def mark(function):
        function.needs = names
        return function

    return mark


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


def _runs_of(item):
    return {run.__name__: run for run in getattr(getattr(item, "module", None), "RUNS", ())}


def pytest_collection_modifyitems(items):
    """The tests that wait for background runs go last: the others run meanwhile."""
    items.sort(key=lambda item: bool(_runs_of(item).keys() & set(item.fixturenames)))


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
    """The worker, started before the first test with the runs the selected tests need; the
    runs that others wait for start first, then the other runs that wait for none."""
    wanted = {}
    for item in request.session.items:
        runs = _runs_of(item)
        todo = [name for name in item.fixturenames if name in runs]
        while todo:
            run = runs[todo.pop()]
            if run.__name__ not in wanted:
                wanted[run.__name__] = run
                todo += getattr(run, "needs", ())
    waited_for = {name for run in wanted.values() for name in getattr(run, "needs", ())}
    ordered = sorted(  # in each group, in the order of their module's RUNS
        wanted.values(),
        key=lambda run: (
            run.__name__ not in waited_for,
            bool(getattr(run, "needs", ())),
            sys.modules[run.__module__].RUNS.index(run),
        ),
    )
    if not ordered:
        yield None
        return
    worker = Worker(tmp_path_factory.mktemp("background"), ordered)
    yield worker
    worker.stop()


def background_fixtures(runs):
    """{attribute: fixture} for a module's RUNS: each fixture named after its run, holding the
    run's result (globals().update(background_fixtures(RUNS)) defines them)."""

    def fixture_of(name):
        @pytest.fixture(name=name)
        def result(background_runs):
            return background_runs.result(name)

        return result

    return {f"result_of_{run.__name__}": fixture_of(run.__name__) for run in runs}


if __name__ == "__main__":  # the worker: python conftest.py BASE MODULE:RUN...
    import importlib

    functions = []
    for spec in sys.argv[2:]:
        module, name = spec.split(":")
        functions.append(getattr(importlib.import_module(module), name))
    Runs(Path(sys.argv[1]), functions)
