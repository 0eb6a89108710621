"""Reproducible to the bit, and safe under interruption, resumption and a full disk."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    REPO,
    RunsCode,
    leftovers,
    params,
    run_study,
    tiny_overrides,
    train_outputs,
    write_params,
)

from transfer_study.core import paths
from transfer_study.core.atomic import write_json
from transfer_study.core.params_file import deep_merge
from transfer_study.core.stage import exit_on_user_error
from transfer_study.data.splits import load_split
from transfer_study.evaluate import evaluate_models
from transfer_study.featurize import featurize, featurize_model
from transfer_study.train.fit import train_model


def test_same_params_same_bytes_on_the_cpu(trained_study, tmp_path):
    # split, featurize vgg16, train mlp and vgg16, evaluate: the session's run, then this one.
    first, second = trained_study.root, tmp_path
    run_study(second, trained_study.archive)
    for split in ("train", "val", "test"):
        a, b = (load_split(f / paths.split_file(split)) for f in (first, second))
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.images, b.images)
    features = paths.features_file("vgg16", "train")
    assert (first / features).read_bytes() == (second / features).read_bytes()
    for name in ("mlp", "vgg16"):
        a, b = (torch.load(f / paths.model_file(name), weights_only=True) for f in (first, second))
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    evaluation = paths.EVALUATE_METRICS
    assert (first / evaluation).read_bytes() == (second / evaluation).read_bytes()


def test_deterministic_param_reaches_torch(workdir, archive):
    seen = []

    class Record(pl.Callback):
        def on_train_start(self, trainer, module):
            seen.append(torch.are_deterministic_algorithms_enabled())

    for flag in (True, False):
        p = params(archive, train={"deterministic": flag, "max_epochs": 1})
        train_model("mlp", p, callbacks=[Record()])
    assert seen == [True, False]


class Interrupt(pl.Callback):
    """Stops training like a killed job, once `epochs` epochs are checkpointed."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch + 1 == self.epochs:
            raise RuntimeError("killed")


def test_resume_continues_an_interrupted_run(workdir, archive):
    settings = {"max_epochs": 6, "patience": 6, "resume": True}
    uninterrupted = train_model("mlp", params(archive, train=settings))
    assert not uninterrupted["resumed"] and uninterrupted["epochs"] == 6
    reference = np.loadtxt(paths.history_file("mlp"), delimiter=",", skiprows=1)

    with pytest.raises(RuntimeError, match="killed"):
        train_model("mlp", params(archive, train=settings), callbacks=[Interrupt(3)])
    assert (paths.checkpoint_dir("mlp") / "last.ckpt").exists()
    resumed = train_model("mlp", params(archive, train=settings))
    assert resumed["resumed"] and resumed["epochs"] == 6
    history = np.loadtxt(paths.history_file("mlp"), delimiter=",", skiprows=1)
    assert history[:, 0].tolist() == [1, 2, 3, 4, 5, 6]  # the first attempt's epochs kept
    # Epoch 3 was lost with the kill (its checkpoint was not written) and ran again, drawing the
    # same random numbers from the saved random state: every epoch matches.
    np.testing.assert_allclose(history, reference, rtol=1e-5)
    # DVCLive's curves hold the first attempt's epochs too (DVC empties its folder on a rerun).
    curve = pd.read_csv(paths.live_dir("mlp") / "plots/metrics/val/loss.tsv", sep="\t")
    assert curve["step"].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(curve["loss"], reference[:, 3], rtol=1e-5)
    assert not paths.checkpoint_dir("mlp").exists()  # finished: nothing left to resume


def test_resume_ignores_a_checkpoint_of_another_configuration(workdir, archive):
    with pytest.raises(RuntimeError, match="killed"):
        train_model("mlp", params(archive, train={"max_epochs": 4}), callbacks=[Interrupt(2)])
    p = params(archive, train={"max_epochs": 4, "resume": True, "lr": 0.01})
    assert not train_model("mlp", p)["resumed"]


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_resume_from_a_damaged_checkpoint_starts_over(workdir, archive, damage, capfd):
    settings = {"max_epochs": 4, "patience": 4, "resume": True}
    with pytest.raises(RuntimeError, match="killed"):
        train_model("mlp", params(archive, train=settings), callbacks=[Interrupt(3)])
    last, sentinel = paths.checkpoint_dir("mlp") / "last.ckpt", workdir / "sentinel"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        torch.save({"state_dict": RunsCode(sentinel), "rng_state": 0, "loops": {}}, last)
    metrics = train_model("mlp", params(archive, train=settings))
    assert not metrics["resumed"] and metrics["epochs"] == 4
    assert "last.ckpt is damaged or not a checkpoint; starting over" in capfd.readouterr().err
    assert not sentinel.exists()


@pytest.fixture
def stage():
    """Starts stage scripts in a project folder; any still running when the test ends, passed or
    failed, is killed, so that a failure never leaves a training process behind."""
    started = []

    def start(workdir, *args):
        env = {**os.environ, "PYTHONPATH": f"{REPO}/src"}
        command = [sys.executable, f"{REPO}/stages/{args[0]}.py", *args[1:]]
        process = subprocess.Popen(command, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def digests(*roots):
    """{path: SHA-256} of each file at or under `roots` (none for a root that is missing)."""
    files = [f for root in map(Path, roots) for f in (root, *root.rglob("*")) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def previous_training(name):
    """The digests of a training stage's outputs, DVCLive's folder included."""
    found = digests(*train_outputs(name), paths.live_dir(name))
    assert len(found) > 4  # a previous run's files: the three outputs and DVCLive's
    return found


@pytest.mark.slow  # a process of its own
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_training_leaves_the_previous_outputs(study, signum, stage):
    long_run = {"max_epochs": 10_000, "patience": 10_000}
    overrides = deep_merge(tiny_overrides(study.archive), {"train": long_run})
    write_params(study.root / "params.yaml", overrides)
    before = previous_training("mlp")
    process = stage(study.root, "train", "mlp")
    wait_for((paths.checkpoint_dir("mlp") / "last.ckpt").exists, process)
    process.send_signal(signum)
    assert process.wait(timeout=60) == 130  # as featurize: not Lightning's exit status 1
    assert "interrupted: no output of this stage was completed" in process.stderr.read()
    assert previous_training("mlp") == before
    assert leftovers(study.root) == []
    assert (paths.checkpoint_dir("mlp") / "last.ckpt").is_file()  # kept for train.resume


class Fail(pl.Callback):
    """Training that raises in its first epoch (no epoch saved), or that diverges: NaN weights
    from the start, so val_loss is never finite and the stage refuses the run after it."""

    def __init__(self, how):
        self.how = how

    def on_train_start(self, trainer, module):
        if self.how == "diverges":
            for weights in module.parameters():
                weights.data.fill_(float("nan"))

    def on_train_epoch_end(self, trainer, module):
        if self.how == "raises":
            raise RuntimeError("crashed")


@pytest.mark.parametrize("how", ["raises", "diverges"])
def test_failed_training_leaves_the_previous_outputs(study, how, capsys):
    before = previous_training("mlp")
    stage_main = exit_on_user_error(train_model)
    with pytest.raises(RuntimeError if how == "raises" else SystemExit):
        stage_main("mlp", study.params_with(train={"max_epochs": 3}), callbacks=[Fail(how)])
    if how == "diverges":
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: mlp: val_loss was never finite; lower mlp.train.lr"
        )
    assert previous_training("mlp") == before
    assert leftovers(study.root) == []
    assert not paths.checkpoint_dir("mlp").exists()  # nothing a resumed run could continue


def previous_cache(name):
    """The digests of a featurize stage's outputs."""
    found = digests(paths.features_dir(name), paths.featurize_metrics(name))
    assert len(found) == 7  # train, val, test, their mirrored train and test, meta, metrics
    return found


@pytest.mark.slow  # a process of its own
def test_interrupted_featurize_leaves_the_previous_cache(study, stage):
    slow = {"vgg16": {"image_size": 224}}  # seconds per split on a CPU
    write_params(study.root / "params.yaml", deep_merge(tiny_overrides(study.archive), slow))
    before = previous_cache("vgg16")
    process = stage(study.root, "featurize", "vgg16")
    # The train features are written whole, the val features are being written.
    wait_for(lambda: list(paths.features_dir("vgg16").glob(".val.tmp*")), process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    assert "interrupted: no output of this stage was completed" in process.stderr.read()
    assert previous_cache("vgg16") == before and leftovers(study.root) == []


def test_failed_featurize_leaves_the_previous_cache(study, monkeypatch):
    before = previous_cache("vgg16")
    real = featurize

    def fails_at_val(extractor, images, out_path, *args, **kwargs):
        if Path(out_path).stem == "val":  # after the train features are written whole
            raise RuntimeError("crashed")
        return real(extractor, images, out_path, *args, **kwargs)

    monkeypatch.setattr("transfer_study.featurize.featurize", fails_at_val)
    with pytest.raises(RuntimeError, match="crashed"):
        featurize_model("vgg16", study.params.model("vgg16"))
    assert previous_cache("vgg16") == before and leftovers(study.root) == []


class SwallowedSigint(pl.Callback):
    """At Lightning hook `hook`, a SIGINT to this process whose KeyboardInterrupt is lost."""

    def __init__(self, hook):
        self.step_at_signal = self.step_at_stop = None
        setattr(self, hook, self.fire)

    def fire(self, trainer, *args, **kwargs):
        if self.step_at_signal is None:
            self.step_at_signal = trainer.global_step
            swallow_a_sigint()

    def on_exception(self, trainer, module, exception):
        self.step_at_stop = trainer.global_step


class SignalledInFinalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises in here, and Python only prints it: lost


def swallow_a_sigint():
    """A SIGINT that arrives while a finalizer runs (as a file object's, closed by the garbage
    collector in a checkpoint write): its KeyboardInterrupt never reaches the stage."""
    SignalledInFinalizer()  # collected at once


@pytest.fixture
def stage_signals(monkeypatch):
    """A stage's signal handling in this process, put back afterwards (pytest's own, and no stop
    signal recorded)."""
    monkeypatch.setattr("transfer_study.core.stage._stop_signal", None)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize(
    "hook",  # set-up, an epoch, validation, a checkpoint write
    ["on_fit_start", "on_train_batch_end", "on_validation_batch_end", "on_save_checkpoint"],
)
def test_a_lost_sigint_still_stops_training(workdir, archive, hook, stage_signals, capsys):
    settings = {"max_epochs": 3, "patience": 3}
    stage_main, lost = exit_on_user_error(train_model), SwallowedSigint(hook)
    with pytest.raises(SystemExit) as exit_info:
        stage_main("mlp", params(archive, train=settings), callbacks=[lost])
    assert exit_info.value.code == 130
    assert lost.step_at_stop == lost.step_at_signal  # not one optimizer step more
    assert "interrupted: no output of this stage was completed" in capsys.readouterr().err
    assert not any(output.exists() for output in train_outputs("mlp"))
    assert leftovers(workdir) == []


def test_a_lost_sigint_still_stops_featurizing(tmp_path, stage_signals, capsys):
    batches = []

    def extractor(batch):
        if not batches:
            swallow_a_sigint()
        batches.append(len(batch))
        return batch.float().flatten(1)

    images = np.zeros((600, 3, 8, 8), dtype=np.uint8)  # many CPU batches
    out = tmp_path / "features" / "train.npy"
    stage_main = exit_on_user_error(featurize)
    with pytest.raises(SystemExit) as exit_info:
        stage_main(extractor, images, out, 192, torch.device("cpu"))
    assert exit_info.value.code == 130 and len(batches) == 1  # stopped at the next batch
    assert "interrupted" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []


def test_full_disk_leaves_no_partial_features(tmp_path, monkeypatch, capsys):
    real_open = open

    class FullDisk:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def write(self, data):
            if self.file.tell() > 0:  # the header fits; the first batch does not
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr("transfer_study.featurize.open", FullDisk, raising=False)
    images = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    out = tmp_path / "features" / "train.npy"

    @exit_on_user_error
    def stage_main():
        featurize(lambda x: x.float().flatten(1), images, out, 192, torch.device("cpu"))

    with pytest.raises(SystemExit) as exit_info:
        stage_main()
    assert exit_info.value.code == 2
    assert "error: disk full" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []  # no partial file for DVC to cache


def test_split_metrics_count_skipped_images(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (9, 9), (i * 20, 0, 0)).save(tmp_path / "imgs" / name / f"{i}.png")
    (tmp_path / "imgs" / "cat" / "bad.png").write_bytes(b"not a png")
    data = {"dataset": "folder", "path": "imgs", "image_size": 8, "bad_images": "skip"}
    write_params(tmp_path / "params.yaml", {"data": data})
    env = {**os.environ, "PYTHONPATH": f"{REPO}/src"}
    for name in ("download", "split"):
        result = subprocess.run(
            [sys.executable, f"{REPO}/stages/{name}.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics" / "split.json").read_text())
    assert metrics["skipped"] == 1 and metrics["train"]["total"] + metrics["val"]["total"] == 16
    assert "skipped unreadable image imgs/cat/bad.png" in result.stderr


def test_a_folder_it_may_not_write_gets_one_line(capsys):
    # As root (CI), permission bits do not stop a write: the error a read-only folder raises.
    @exit_on_user_error
    def stage_main():
        raise PermissionError(errno.EACCES, "Permission denied", "metrics/train_mlp.json")

    with pytest.raises(SystemExit) as stop:
        stage_main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: metrics/train_mlp.json: Permission denied; give this user access to it (or its "
        "folder) and rerun"
    ]


def test_training_writes_its_outputs_as_one_set(workdir, archive, monkeypatch, capsys):
    def full_disk(self, path, **kwargs):  # the history, written after the model file's bytes
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)

    @exit_on_user_error
    def stage_main():
        train_model("mlp", params(archive))

    with pytest.raises(SystemExit) as stop:
        stage_main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: disk full writing")
    assert not any(output.exists() for output in train_outputs("mlp"))
    assert leftovers(workdir) == []


def test_no_json_output_holds_nan_or_infinity(tmp_path):
    # Python writes them as NaN and Infinity, which no JSON parser (DVC's included) reads.
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            write_json(tmp_path / "evaluate.json", {"mlp": {"test_loss": value}})
    assert list(tmp_path.iterdir()) == []


def test_a_nan_test_cache_stops_evaluate_and_keeps_its_metrics(study, capsys):
    before = paths.EVALUATE_METRICS.read_bytes()
    test = paths.features_file("vgg16", "test")
    np.save(test, np.full(np.load(test).shape, np.nan, np.float16))
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(evaluate_models)(["mlp", "vgg16"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {test} holds NaN or infinite values; rerun featurize_vgg16 (dvc repro "
        "featurize_vgg16)"
    ]
    assert paths.EVALUATE_METRICS.read_bytes() == before


def test_a_model_whose_test_outputs_overflow_is_not_scored(study, capsys):
    before = paths.EVALUATE_METRICS.read_bytes()
    saved = torch.load(paths.model_file("mlp"), weights_only=True)
    last_bias = [key for key in saved["state_dict"] if key.endswith(".bias")][-1]
    saved["state_dict"][last_bias][0] = float("inf")  # class 0's logit: inf - inf in the loss
    torch.save(saved, paths.model_file("mlp"))
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(evaluate_models)(["mlp", "vgg16"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: mlp: test_loss is nan, its outputs on the test split are not finite; retrain it "
        "with a lower mlp.train.lr (dvc repro train_mlp)"
    ]
    assert paths.EVALUATE_METRICS.read_bytes() == before


def _gone(pid):
    """Whether process `pid` has ended (a zombie nobody reaped has ended too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.slow  # a process of its own
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_stage_whose_dvc_parent_dies_stops_and_writes_nothing(workdir, archive):
    long_run = {"max_epochs": 10_000, "patience": 10_000}
    write_params(workdir / "params.yaml", deep_merge(tiny_overrides(archive), {"train": long_run}))
    launcher = (  # stands in for DVC: starts the stage, then is killed with SIGKILL
        "import subprocess, sys, time\n"
        "stage = subprocess.Popen(sys.argv[1:], stderr=subprocess.DEVNULL)\n"
        "print(stage.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}/src", "DVC_STAGE": "train_mlp"}
    command = [sys.executable, "-c", launcher, sys.executable, f"{REPO}/stages/train.py", "mlp"]
    parent = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stage_pid = int(parent.stdout.readline())
    wait_for((paths.checkpoint_dir("mlp") / "last.ckpt").exists, parent)  # training runs
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while not _gone(stage_pid):
        assert time.monotonic() < deadline, "the orphaned stage is still running"
        time.sleep(0.1)
    assert not any(output.exists() for output in train_outputs("mlp"))
    assert leftovers(workdir) == []


CRASHING_RUN = """
import pytorch_lightning as pl
from transfer_study.core.config import load_params
from transfer_study.core.stage import exit_on_user_error
from transfer_study.train.fit import train_model

class Crash(pl.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer):
        raise RuntimeError("crashed")

exit_on_user_error(train_model)("mlp", load_params(), callbacks=[Crash()])
"""


@pytest.mark.slow  # a process of its own
def test_a_crash_in_training_ends_with_its_traceback_alone(study):
    """Under DVC, DVCLive holds git objects whose finalizers import; a crash's traceback kept
    them alive to the interpreter's last moments, where each printed "ImportError: sys.meta_path
    is None" after the traceback."""
    write_params(study.root / "params.yaml", tiny_overrides(study.archive))
    env = {**os.environ, "PYTHONPATH": f"{REPO}/src", "DVC_NO_ANALYTICS": "1"}
    env["DVC_STAGE"] = "train_mlp"  # as DVC starts it
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "study"],
        ["git", "gc", "-q"],  # objects in a pack, as in any clone: dulwich's Pack objects
    ):
        subprocess.run(command, cwd=study.root, env=env, check=True)
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN],
        cwd=study.root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith("RuntimeError: crashed"), result.stderr[-3000:]
    assert "Exception ignored" not in result.stderr
