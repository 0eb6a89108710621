"""Fixtures and hooks: fake CIFAR-10 archives, a project folder split from one, the tiny study
trained once per session, and the worker of the background runs (helpers.py)."""

import os

# Runs in the background share the cores with the tests: OpenMP threads that spin while they
# wait would burn the time another process needs, and on tiny batches a second thread costs
# more than it saves (a train_lite0 stage of the tiny study: 11.3 CPU seconds with 2 threads,
# 7.7 with 1). Set before torch loads OpenMP; the worker and the stage processes inherit them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import copy
import dataclasses
import shutil

import pytest
from helpers import Study, Worker, run_study, write_cifar_archive

from transfer_study.core import paths
from transfer_study.data.readers import read_cifar10
from transfer_study.data.splits import make_splits, save_split


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


def _runs_of(item):
    """{name: run} of the RUNS of `item`'s module, in their order there."""
    return {run.__name__: run for run in getattr(getattr(item, "module", None), "RUNS", ())}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the mark must be there to be seen
def pytest_collection_modifyitems(items):
    """The tests that wait for background runs (end-to-end pipelines, searches, notebooks) are
    slow, and go last: the others run meanwhile."""
    waits = {item: bool(_runs_of(item).keys() & set(item.fixturenames)) for item in items}
    for item in (item for item in items if waits[item]):
        item.add_marker(pytest.mark.slow)
    items.sort(key=waits.get)


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
    """The worker, started before the first test with the runs the selected tests need; the
    runs that others wait for start first, then the other runs that wait for none."""
    wanted = {}  # name -> (run, its place in the RUNS of the first module listing it)
    for item in request.session.items:
        runs = _runs_of(item)
        todo = [name for name in item.fixturenames if name in runs]
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted[name] = (runs[name], list(runs).index(name))
                todo += getattr(runs[name], "needs", ())
    waited_for = {name for run, _ in wanted.values() for name in getattr(run, "needs", ())}
    ordered = sorted(  # in each group, in the order of their module's RUNS
        wanted.values(),
        key=lambda entry: (
            entry[0].__name__ not in waited_for,
            bool(getattr(entry[0], "needs", ())),
            entry[1],
        ),
    )
    if not ordered:
        yield None
        return
    worker = Worker(tmp_path_factory.mktemp("background"), [run for run, _ in ordered])
    yield worker
    worker.stop()
