"""The notebook, run top to bottom by papermill as a student runs it, in a copy of the reproduced
tiny study (offline, on the CPU), and checked by what its cells printed and showed. Its run is
also the suite's end-to-end run of a study with models left out (VGG16 and InceptionV3) and of a
queued grid whose `data.url` is relative to the project."""

import json
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from helpers import (
    ALL_STAGES,
    DECLARED,
    REPO,
    background_fixtures,
    committed,
    copy_project,
    plotted_models,
    run,
    stages_run,
)

from transfer_study import notebook
from transfer_study.notebook import StudyError, overrides, settings

NOTEBOOK = Path(REPO) / "notebooks" / "run_the_study.ipynb"
SOURCES = Path(REPO).parent / "shared" / "datasets" / "SOURCES.json"
SAMPLE = SOURCES.with_name("cifar-10-sample-python.tar.gz")
KEPT = ["mlp", "lite0"]  # in the notebook's study
GRID = {"labels-1": 3, "labels-2": 5}  # the queued experiments: train.per_class


def executed_notebook(runs):
    """The notebook executed with tiny parameters in a fresh copy of the committed tiny study
    (no result committed, as in a new clone): the CIFAR-10 sample beside the project, read by a
    relative path with its md5 checked (the fake archive where ../shared is absent), capped at
    the tiny study's sizes; MLP and Lite0 only; an MLP change to compare; a grid of two
    per_class values. {project, seconds, each queued experiment's log, `dvc plots diff --json`
    of the grid, `dvc exp show --json`}."""
    import papermill

    root = copy_project(committed(runs), runs.folder("notebook") / "project")
    committed_params = yaml.safe_load((root / "params.yaml").read_text())
    (root.parent / "mirror").mkdir()
    data, md5 = committed_params["data"]["url"], None
    if SAMPLE.exists():
        data, md5 = SAMPLE, json.loads(SOURCES.read_text())[SAMPLE.name]["md5"]
    shutil.copy(data, root.parent / "mirror" / "cifar.tar.gz")
    started = time.monotonic()
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(root / "executed.ipynb"),
        parameters={
            "DATA": "../mirror/cifar.tar.gz",
            "DATA_MD5": md5,
            "MODELS": KEPT,
            "IMAGE_SIZES": {"lite0": 32},
            "EPOCHS": 2,
            "EXTRA": {"lite0.weights": "none"},
            "CHANGE": {"mlp.dropout": 0.5},  # the MLP's alone: one training stage reruns
            "PER_CLASS": list(GRID.values()),
        },
        cwd=str(root),
        kernel_name="python3",
        progress_bar=False,
    )
    return {
        "project": root,
        "seconds": round(time.monotonic() - started, 1),
        "logs": {name: run(root, "dvc", "queue", "logs", name) for name in GRID},
        "plots": json.loads(run(root, "dvc", "plots", "diff", "--json", *GRID)),
        "shown": json.loads(run(root, "dvc", "exp", "show", "--json")),
    }


RUNS = [executed_notebook]
globals().update(background_fixtures(RUNS))


def outputs(notebook, tag):
    """The outputs of the cell tagged `tag`: (its printed text, {mime type: [data, ...]})."""
    (cell,) = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    text, shown = "", {}
    for output in cell.outputs:
        if output.output_type == "stream":
            text += output.text
        for mime, data in output.get("data", {}).items():
            shown.setdefault(mime, []).append(data)
    return text, shown


@pytest.fixture
def executed(executed_notebook):
    project = Path(executed_notebook["project"])
    return project, nbformat.read(project / "executed.ipynb", as_version=4)


def test_the_answer_table_holds_what_the_pipeline_measured(executed):
    project, notebook = executed
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    _, shown = outputs(notebook, "answer-table")
    (table,) = shown["text/plain"]
    rows = dict(re.findall(r"^(\w+)\s+([\d.]+)\s", table, flags=re.M))
    assert list(rows) == KEPT  # the study's models, in report order, nothing else
    for name in KEPT:
        assert float(rows[name]) == pytest.approx(evaluation[name]["test_accuracy"], abs=1e-4)


def test_the_figures_are_the_reports_and_the_best_models(executed):
    project, notebook = executed
    printed, shown = outputs(notebook, "figures")
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    best = max(KEPT, key=lambda m: evaluation[m]["test_accuracy"])
    names = ["learning_curves", "cost", f"confusion_{best}", f"misclassified_{best}"]
    assert printed.split() == [f"reports/figures/{name}.png" for name in names]
    assert len(shown["image/png"]) == 4


def test_left_out_models_write_markers_and_stay_out_of_the_report(executed):
    project, notebook = executed
    printed, _ = outputs(notebook, "study")
    # The notebook's study, on new data, runs every stage: the left-out ones write markers.
    assert stages_run(printed) == sorted(ALL_STAGES)
    # The notebook ends with the study applied to the workspace again.
    assert json.loads((project / "metrics/train_vgg16.json").read_text()) == {"skipped": True}
    assert set(json.loads((project / "metrics/evaluate.json").read_text())) == set(KEPT)
    report = (project / "reports/report.md").read_text()
    assert "| lite0 |" in report and "| vgg16 |" not in report
    models = plotted_models(project)  # no left-out model on any plot or legend
    assert all(shown == set(KEPT) for title, shown in models.items() if title != "images")
    assert not [image for image in models["images"] if "vgg16" in image or "inception" in image]
    assert not (project / "reports/figures/confusion_vgg16.png").exists()
    assert not (project / "reports/figures/confusion_inception.png").exists()


def test_the_change_reruns_only_its_stages_and_is_compared(executed):
    _, notebook = executed
    printed, shown = outputs(notebook, "compare")
    assert stages_run(printed) == ["evaluate", "report", "train_mlp"]
    (table,) = shown["text/plain"]
    assert re.search(r"^study\s+0\.2\s", table, flags=re.M)  # mlp.dropout, then accuracies
    assert re.search(r"^study-changed\s+0\.5\s", table, flags=re.M)
    assert "mlp.dropout" in table and "lite0 test accuracy" in table
    diff, _ = outputs(notebook, "diff")
    assert "dvclive/mlp/metrics.json" in diff and "dvc_plots/index.html" in diff


def test_the_labels_grid_says_its_time_first_and_draws_the_curve(executed):
    project, notebook = executed
    printed, _ = outputs(notebook, "grid")
    estimate = printed.index("2 experiments, one after another: roughly")
    assert estimate < printed.index("Running stage")
    _, shown = outputs(notebook, "labels-curve")
    assert len(shown["image/png"]) == 1
    (curve,) = shown["text/plain"][1:]  # the figure's text, then the table's
    assert re.search(r"^model\s+mlp\s+lite0$", curve, flags=re.M)  # the report's order
    for per_class in GRID.values():  # the grid's points, then the study's: every label
        assert re.search(rf"^{per_class}\s+[\d.]+\s+[\d.]+$", curve, flags=re.M)
    per_class = json.loads((project / "metrics/train_mlp.json").read_text())["train_images"] / 10
    assert re.search(rf"^{per_class:g}\s", curve, flags=re.M)


def test_a_queued_per_class_grid_trains_only_and_its_plots_diff_is_the_curve(executed_notebook):
    """Queued experiments run in a copy under .dvc/tmp/exps/, yet `data.url` relative to the
    project finds the archive beside the project (md5 checked, on the sample)."""
    logs = executed_notebook["logs"]
    # Cached features serve every size: the experiments train, evaluate and report, and
    # featurize nothing, though git tracks no result yet (the notebook copies them in).
    trained = sorted(["evaluate", "report", *(f"train_{m}" for m in DECLARED)])
    for log in logs.values():
        assert stages_run(log) == trained
    results = {}
    for baseline in executed_notebook["shown"]:
        queued = [e for e in baseline.get("experiments") or [] if e["revs"][0]["name"] in logs]
        for experiment in queued:  # not the study's own experiments
            data = experiment["revs"][0]["data"]
            per_class = data["params"]["params.yaml"]["data"]["train"]["per_class"]
            results[per_class] = data["metrics"]["metrics/evaluate.json"]["data"]["mlp"]
    assert set(results) == set(GRID.values()) and results[3] != results[5]
    # `dvc plots diff` of the grid is the curve: one chart, a point per model and experiment.
    plots = executed_notebook["plots"]["data"]
    (curve,) = plots["Test accuracy against labeled train images per class"]
    assert sorted(curve["revisions"]) == sorted(GRID) and "facet" not in curve["content"]
    points = curve["content"]["data"]["values"]
    assert {(p["model"], p["labeled_per_class"]) for p in points} == {
        (m, str(n)) for m in KEPT for n in GRID.values()
    }


def test_the_committed_notebook_holds_no_outputs_and_a_parameters_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1  # papermill injects its values after this cell


def test_overrides_reach_dvc_as_the_values_given():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {
        "data.url": "../a,b/cifar.tar.gz",  # a comma would otherwise make a grid
        "data.md5": None,
        "models": {"mlp": True, "vgg16": False},
        "train.lr": 1e-4,
        "mlp.hidden": [512, 256],
        "lite0.weights": "none",  # the string, not YAML's null
        "++lite0.train.lr": 0.01,
    }
    args = overrides(values)
    assert args[::2] == ["-S"] * len(values)
    parsed = OverridesParser.create().parse_overrides(args[1::2])  # DVC's parser of -S
    assert {o.key_or_group: o.value() for o in parsed} == {
        key.removeprefix("++"): value for key, value in values.items()
    }
    assert not any(o.is_sweep_override() for o in parsed)


def test_an_unknown_model_is_one_line_naming_the_valid_ones(monkeypatch):
    monkeypatch.setattr(
        notebook, "workspace_params", lambda: {"models": {"mlp": True, "lite0": True}}
    )
    with pytest.raises(
        StudyError, match=r"^error: MODELS = \['vgg19'\]: name one or more of mlp, lite0$"
    ):
        settings(models=["vgg19"])
    assert "-S" in settings(models=["mlp"])
