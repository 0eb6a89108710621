"""The notebook, run top to bottom by papermill as a student runs it, in a copy of the reproduced
tiny study (offline, on the CPU), and checked by what its cells printed and showed."""

import json
import re
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import REPO, background_fixtures, needs
from test_pipeline import DECLARED, finished, reproduced, stages_run

NOTEBOOK = Path(REPO) / "notebooks" / "run_the_study.ipynb"
MODELS = ["mlp", "lite0"]


@needs("reproduced")
def executed_notebook(runs):
    """The notebook executed with tiny parameters: the tiny study's archive and sizes, MLP and
    Lite0 only, an MLP change to compare, a grid of one per_class value. {project, seconds}."""
    import papermill

    root = finished(runs, "notebook")
    archive = yaml.safe_load((root / "params.yaml").read_text())["data"]["url"]
    started = time.monotonic()
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(root / "executed.ipynb"),
        parameters={
            "DATA": archive,
            "DATA_MD5": None,
            "MODELS": MODELS,
            "IMAGE_SIZES": {"lite0": 32},
            "EPOCHS": 2,
            "EXTRA": ["lite0.weights=none"],
            "CHANGE": "mlp.dropout=0.5",  # the MLP's alone: one training stage reruns
            "PER_CLASS": [3],
        },
        cwd=str(root),
        kernel_name="python3",
        progress_bar=False,
    )
    return {"project": root, "seconds": round(time.monotonic() - started, 1)}


RUNS = [reproduced, executed_notebook]
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
    assert list(rows) == MODELS  # the study's models, in report order, nothing else
    for name in MODELS:
        assert float(rows[name]) == pytest.approx(evaluation[name]["test_accuracy"], abs=1e-4)


def test_the_figures_are_the_reports_and_the_best_models(executed):
    project, notebook = executed
    printed, shown = outputs(notebook, "figures")
    evaluation = json.loads((project / "metrics/evaluate.json").read_text())
    best = max(MODELS, key=lambda m: evaluation[m]["test_accuracy"])
    names = ["learning_curves", "cost", f"confusion_{best}", f"misclassified_{best}"]
    assert printed.split() == [f"reports/figures/{name}.png" for name in names]
    assert len(shown["image/png"]) == 4


def test_the_change_reruns_only_its_stages_and_is_compared(executed):
    _, notebook = executed
    printed, shown = outputs(notebook, "compare")
    assert stages_run(printed) == ["evaluate", "report", "train_mlp"]
    (table,) = shown["text/plain"]
    assert re.search(r"^study\s+0\.2\s", table, flags=re.M)  # mlp.dropout, then accuracies
    assert re.search(r"^study-changed\s+0\.5\s", table, flags=re.M)
    assert "mlp.dropout" in table and "lite0 test accuracy" in table
    diff, _ = outputs(notebook, "diff")
    assert "dvclive/mlp/metrics.json" in diff and "plots-diff" in diff


def test_the_labels_grid_says_its_time_first_and_draws_the_curve(executed):
    project, notebook = executed
    printed, _ = outputs(notebook, "grid")
    estimate = printed.index("1 experiment, one after another: roughly")
    assert estimate < printed.index("Running stage")
    assert stages_run(printed) == sorted(["evaluate", "report", *(f"train_{m}" for m in DECLARED)])
    _, shown = outputs(notebook, "labels-curve")
    assert len(shown["image/png"]) == 1
    (curve,) = shown["text/plain"][1:]  # the figure's text, then the table's
    assert re.search(r"^3\.0\s+[\d.]+\s+[\d.]+$", curve, flags=re.M)  # the grid's point
    per_class = json.loads((project / "metrics/train_mlp.json").read_text())["train_images"] / 10
    assert re.search(rf"^{per_class}\s", curve, flags=re.M)  # the study's, every label


def test_the_committed_notebook_holds_no_outputs_and_a_parameters_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1  # papermill injects its values after this cell
