"""The benchmark runs end to end at CI size; its figures are printed, never asserted."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, background_fixtures, write_cifar_archive

from transfer_study.bench.__main__ import main


def test_bench_prints_the_ratio_keys_last(capsys):
    summary = main(["--images", "48", "--image-size", "32", "--backbones", "vgg16"])
    assert {
        "vgg16_6epoch_speedup",
        "head_epoch_speedup",
        "featurize_speedup",
        "mlp_epoch_speedup",
        "device",
    } <= summary.keys()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


@pytest.mark.parametrize("argv", [["--images", "x"], ["study", "-S", "x"], ["--bogus"]])
def test_bad_arguments_are_answered_before_torch_is_imported(argv):
    code = (
        "import sys\n"
        "from transfer_study.bench.__main__ import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "error: " in result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["cut", "--images", "-5"],
            " cut: error: argument --images: accepts an integer >= 1, got '-5'",
        ),
        (
            ["cut", "--images", "0"],
            " cut: error: argument --images: accepts an integer >= 1, got '0'",
        ),
        (
            ["cut", "--trainable-layers", "0"],
            " cut: error: argument --trainable-layers: accepts an ",
        ),
        (
            ["cut", "--epochs", "-3"],
            " cut: error: argument --epochs: accepts an integer >= 0, got ",
        ),
        (
            ["cut", "--test-images", "-1"],
            " cut: error: argument --test-images: accepts an integer ",
        ),
        (
            ["cut", "--seeds", "0"],
            " cut: error: argument --seeds: accepts an integer >= 1, got '0'",
        ),
        (["--images", "0"], ": error: argument --images: accepts an integer >= 1, got '0'"),
        (["--image-size", "-1"], ": error: argument --image-size: accepts an integer >= 1, got "),
    ],
)
def test_counts_below_their_bound_are_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    # argparse's usage, then its one error line
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"python -m transfer_study.bench{message}")


def study_timer(runs):
    """The study timer on a tiny study, by its command line: its exit status, stdout, stderr's
    end, and what its main() returned (written to stderr last by the wrapper below)."""
    archive = write_cifar_archive(runs.folder("study_timer") / "cifar.tar.gz")
    tiny = [
        "data.train_size=150",
        "data.test_size=50",
        "train.max_epochs=2",
        "train.batch_size=32",
        "models={mlp: false, vgg16: false, inception: false}",  # Lite0 alone
        "lite0.weights=none",
        "lite0.image_size=32",
    ]
    # The cheapest change that reruns a stage with batches: test-time flips rerun evaluate
    # (the mirrored test features are cached) and report.
    argv = ["study", "--project", REPO, "--archive", str(archive), "--rerun", "evaluate.hflip=true"]
    wrapper = (
        "import json, sys\n"
        "from transfer_study.bench.__main__ import main\n"
        "returned = main(sys.argv[1:])\n"
        "print('returned: ' + json.dumps(returned), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *argv, *(f"-S{setting}" for setting in tiny)],
        env={**os.environ, "PYTHONPATH": f"{REPO}/src"},
        capture_output=True,
        text=True,
    )
    returned = result.stderr.rstrip().rsplit("\n", 1)[-1].removeprefix("returned: ")
    return result.returncode, result.stdout, result.stderr[-3000:], returned


RUNS = [study_timer]  # background runs (helpers.py)
globals().update(background_fixtures(RUNS))


def test_study_timer_times_every_stage_then_only_what_a_change_reruns(study_timer):
    code, stdout, stderr, returned = study_timer
    assert code == 0, stderr
    summary = json.loads(returned)
    assert json.loads(stdout.strip().splitlines()[-1]) == summary  # printed last, as returned
    stages = summary["stages"]
    assert {"download", "split", "featurize_lite0", "train_lite0", "evaluate", "report"} <= set(
        stages
    )
    for times in stages.values():
        assert 0 <= times["startup_seconds"] <= times["seconds"] <= summary["total_seconds"]
    # Images went through the batch stages: 220 images featurized (120 train, 30 val and 50
    # test, 50 mirrored test), 120 train images' features x 2 epochs, 50 test images scored.
    for name in ("featurize_lite0", "train_lite0", "evaluate"):  # stages with batches
        times = stages[name]
        assert times["images_per_second"] > 0
        # A first batch was marked (its work may round to 0.00 s: 50 test images, say).
        assert 0 < times["startup_seconds"] <= times["seconds"]
    assert stages["split"]["images_per_second"] is None
    assert stages["train_mlp"]["images_per_second"] is None  # left out: markers only
    assert set(summary["test_accuracy"]) == {"lite0"}
    rerun = summary["rerun"]["stages"]
    # Nothing upstream of the change; report too where evaluate's results moved (Lite0 with
    # random weights may score the same either way: then DVC skips report).
    assert "evaluate" in rerun and set(rerun) <= {"evaluate", "report"}
    assert rerun["evaluate"]["images_per_second"] > 0
    assert set(summary["rerun"]["test_accuracy"]) == {"lite0"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-S", "train.lr"], "-S 'train.lr': expected key=value, e.g. -S train.lr=1e-4"),
        (["-S", "mlp.hidden=[1,2"], "-S 'mlp.hidden=[1,2': the value is not YAML"),
        (["-S", "train.lr=-1"], "train.lr = -1.0: accepts a number > 0"),
        (["--archive", "/no/such.tar.gz"], "--archive /no/such.tar.gz: no such file"),
        (["--rerun", "train.lr=-1"], "train.lr = -1.0: accepts a number > 0"),
        (["--rerun", "train.lr"], "--rerun 'train.lr': expected key=value, e.g. --rerun train.lr"),
        (
            # Past Python's 4,300-digit limit on int(), as a 50 MB one is, and parsed in a blink.
            ["-S", "seed=" + "9" * 100_000],
            f"-S 'seed={'9' * 12}...{'9' * 18}': the value is not YAML (an integer too long",
        ),
    ],
)
def test_study_timer_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["study", "--project", REPO, *argv])
    assert exit.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_study_timer_reads_plus_plus_keys_as_dvc_does():
    from transfer_study.bench.study import parse_assignment

    assert parse_assignment("++mlp.train.lr=1e-4") == {"mlp": {"train": {"lr": "1e-4"}}}
    assert parse_assignment("models={vgg16: false}") == {"models": {"vgg16": False}}
