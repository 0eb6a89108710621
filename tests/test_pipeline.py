"""End to end: `dvc repro` on a copy of the repository, then the rerun rules.

`dvc repro` of the tiny study runs once; each run that changes something works on a copy of
that finished project (its git history and DVC cache with it), so that every test passes alone
and in any order. The runs are background runs (helpers.py): started before the first test, in
a worker process, while the other tests run. Each test checks what its own run did. A study
with models left out and a queued grid, run through the notebook: tests/test_notebook.py.
"""

import csv
import io
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import (
    ALL_STAGES,
    DECLARED,
    TRAIN_KEYS,
    background_fixtures,
    copy_project,
    finished,
    needs,
    plotted_models,
    reproduced,
    run,
    stages_run,
)

MODELS = ["mlp", "vgg16", "inception", "lite0"]  # in the study; the other three declared
# models are off in params.yaml: their stages write markers only


def exp_run(runs, name, setting):
    """`dvc exp run -S setting` on a copy of the reproduced study: (project, output)."""
    root = finished(runs, name)
    return root, run(root, "dvc", "exp", "run", "-S", setting)


@needs("reproduced")
def new_lr(runs):
    return exp_run(runs, "new_lr", "train.lr=1e-4")


@needs("reproduced")
def vgg16_image_size(runs):
    return exp_run(runs, "vgg16_image_size", "vgg16.image_size=48")[1]


@needs("reproduced")
def flipped_test_images(runs):
    root = finished(runs, "flipped_test_images")
    before = json.loads((root / "metrics/evaluate.json").read_text())
    output = run(root, "dvc", "exp", "run", "-S", "evaluate.hflip=true")
    return before, output, json.loads((root / "metrics/evaluate.json").read_text())


@needs("reproduced")
def interrupted_then_mlp_change(runs):
    """`dvc repro train_mlp` interrupted like Ctrl+C in its terminal, then `dvc exp run` of a
    new MLP architecture and lr: what each step left."""
    root = finished(runs, "interrupted")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["mlp"]["train"] = {"max_epochs": 40, "patience": 40}  # long enough to interrupt
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "DVC_NO_ANALYTICS": "1"}
    repro = subprocess.Popen(
        ["dvc", "repro", "train_mlp"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a terminal's Ctrl+C reaches
    )
    last = root / "checkpoints" / "mlp" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists():
        assert repro.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGINT)
    steps = {"exit": repro.wait(timeout=60), "status": run(root, "dvc", "status")}
    steps["half-written"] = list(root.rglob(".*.tmp*"))
    # ++: mlp.train lacks lr in params.yaml, and DVC only overrides keys that exist without it.
    steps["exp run"] = run(
        root,
        *("dvc", "exp", "run", "-S", "mlp.hidden=[512,256]", "-S", "++mlp.train.lr=0.01"),
        *("-S", "mlp.train.max_epochs=3"),  # no longer to be interrupted
    )
    steps["saved"] = torch.load(root / "models/mlp.pt", weights_only=True)["config"]["section"]
    steps["metrics"] = json.loads((root / "metrics/train_mlp.json").read_text())
    steps["status after"] = run(root, "dvc", "status")
    return steps


RUNS = [  # each one's name is the fixture of its result
    reproduced,
    new_lr,
    interrupted_then_mlp_change,
    vgg16_image_size,
    flipped_test_images,
]


globals().update(background_fixtures(RUNS))


@pytest.fixture
def project(reproduced, tmp_path):
    """A copy of the reproduced study, for a test that asks DVC about it."""
    source, _ = reproduced
    return copy_project(Path(source), tmp_path / "project")


def test_repro_runs_every_stage_and_writes_every_output(reproduced):
    project, output = Path(reproduced[0]), reproduced[1]
    assert stages_run(output) == sorted(ALL_STAGES)
    for name in MODELS:
        metrics = json.loads((project / f"metrics/train_{name}.json").read_text())
        assert TRAIN_KEYS <= metrics.keys()
        assert (project / f"plots/history/{name}.csv").exists()
        assert (project / f"reports/figures/confusion_{name}.png").exists()
        assert (project / f"reports/figures/misclassified_{name}.png").exists()
        # DVCLive's summary, the headline of training: the kept (best) epoch's figures.
        summary = json.loads((project / f"dvclive/{name}/metrics.json").read_text())
        history = pd.read_csv(project / f"plots/history/{name}.csv")
        best = history.loc[history["val_loss"].idxmin()]
        assert set(summary) == {"step", "val", "epochs", "train_seconds"}
        assert summary["step"] == best["epoch"] == metrics["kept_epoch"]
        assert summary["val"]["loss"] == pytest.approx(best["val_loss"])
        assert summary["val"]["acc"] == pytest.approx(best["val_acc"])
        assert summary["epochs"] == len(history)
        assert (project / f"dvclive/{name}/plots/metrics/val/acc.tsv").exists()
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    assert set(evaluation) == set(MODELS)
    assert all({"test_accuracy", "test_loss"} <= m.keys() for m in evaluation.values())
    # Progress as a log gets it: no carriage return, at most a line a tenth of each pass (3
    # backbones: train, val, test and mirrored test).
    passes = Counter(re.findall(r"^(\w+ \w+): +\d+% \(", output, flags=re.M))
    assert "\r" not in output and len(passes) >= 3 * 4 and max(passes.values()) <= 10, passes
    report = (project / "reports/report.md").read_text()
    (lite0,) = [row.split(" | ") for row in report.splitlines() if row.startswith("| lite0 |")]
    per_class = json.loads((project / "metrics/train_lite0.json").read_text())["train_images"] / 10
    whole = per_class.is_integer()  # "12", not "12.0"
    assert lite0[2] == (f"{per_class:,.0f}" if whole else f"{per_class:,.1f}")


def test_second_repro_reruns_nothing(project):
    assert stages_run(run(project, "dvc", "repro")) == []


def test_enabling_a_model_changes_only_its_stages_evaluate_and_report(project):
    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["models"]["resnet50"] = True  # its switch alone: no other param of its stages moves
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    changed = json.loads(run(project, "dvc", "status", "--json"))
    assert sorted(changed) == ["evaluate", "featurize_resnet50", "report", "train_resnet50"]


def test_switching_models_off_changes_only_their_stages_evaluate_and_report(project):
    params = project / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["models"] |= {"vgg16": False, "inception": False}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    changed = json.loads(run(project, "dvc", "status", "--json"))
    switched = [f"{stage}_{m}" for stage in ("featurize", "train") for m in ("vgg16", "inception")]
    assert sorted(changed) == sorted(["evaluate", "report", *switched])


def test_new_lr_retrains_every_model_and_featurizes_nothing(new_lr):
    project, output = Path(new_lr[0]), new_lr[1]
    assert stages_run(output) == sorted(["evaluate", "report", *(f"train_{m}" for m in DECLARED)])
    for name in MODELS:
        saved = torch.load(project / f"models/{name}.pt", weights_only=True)
        assert saved["config"]["section"]["train"]["lr"] == 0.0001
        assert json.loads((project / f"metrics/train_{name}.json").read_text())["lr"] == 0.0001


HEADLINE = {"test_accuracy", "test_loss", "step", "loss", "acc", "epochs", "train_seconds"}


def test_metrics_diff_and_exp_show_hold_only_headline_figures(new_lr):
    project = Path(new_lr[0])  # the workspace holds the new lr's results, HEAD the committed ones
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--json"))
    assert set(diff) <= {"metrics/evaluate.json", *(f"dvclive/{m}/metrics.json" for m in MODELS)}
    keys = [key.split(".")[-1] for changes in diff.values() for key in changes]
    assert set(keys) <= HEADLINE and len(keys) <= len(HEADLINE) * len(MODELS)
    assert (
        "dvclive/mlp/metrics.json" in diff and "mlp.test_accuracy" in diff["metrics/evaluate.json"]
    )
    table = list(
        csv.reader(io.StringIO(run(project, "dvc", "exp", "show", "--only-changed", "--csv")))
    )
    columns = [c for c in table[0] if c not in ("rev", "typ")]  # the CSV's extra columns
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values()
    deps = {dep for stage in stages for dep in stage["deps"]}
    # Every column: the experiment, a headline figure (two per model from evaluate, four from
    # DVCLive's summary), the param that changed, or a dependency file that moved.
    others = [c for c in columns if c not in {"Experiment", "Created", "train.lr", *deps}]
    assert all(c.split(":")[-1].split(".")[-1] in HEADLINE for c in others), others
    assert len(others) <= 7 * len(MODELS) and "train.lr" in columns


def test_interrupted_repro_leaves_nothing_complete_and_an_mlp_change_reruns_only_the_mlp(
    interrupted_then_mlp_change,
):
    steps = interrupted_then_mlp_change
    assert steps["exit"] != 0
    assert "train_mlp" in steps["status"]  # not recorded as done
    assert steps["half-written"] == []  # no half-written output anywhere
    # The next run finishes the interrupted stage, and the new architecture and lr rerun the
    # MLP's training, evaluate and report: nothing else.
    assert stages_run(steps["exp run"]) == ["evaluate", "report", "train_mlp"]
    assert steps["saved"]["train"]["lr"] == 0.01 and steps["saved"]["hidden"] == [512, 256]
    assert steps["metrics"]["epochs"] == 3
    assert "up to date" in steps["status after"]


def test_vgg16_image_size_refeaturizes_only_vgg16(vgg16_image_size):
    output = vgg16_image_size
    assert stages_run(output) == ["evaluate", "featurize_vgg16", "report", "train_vgg16"]


def test_test_time_flips_rerun_only_evaluate_and_report(flipped_test_images):
    before, output, after = flipped_test_images
    assert stages_run(output) == ["evaluate", "report"]  # mirrored test features are cached
    assert set(after) == set(before) and after != before


def test_plots_show_tells_every_model_apart(project):
    models = plotted_models(project)
    curves = [t for t in models if t.startswith(("Accuracy by epoch", "Loss by epoch"))]
    assert len(curves) == 2 and all(models[t] == set(MODELS) for t in curves)
    assert models["Test accuracy against compute seconds (featurize + train)"] == set(MODELS)
    assert {f"confusion_{m}.png" for m in MODELS} <= models["images"]
    html = run(project, "dvc", "plots", "show", "-o", "plots_html")
    assert "index.html" in html and (project / "plots_html" / "index.html").exists()
