"""The notebook's verbs: DVC commands with their output streamed, and the study read back
through dvc.api. Nothing here trains or scores: every number comes from the pipeline's files."""

import io
import os
import re

import pandas as pd

from transfer_study import experiments
from transfer_study.core import paths
from transfer_study.experiments import copied_results, experiment_names, flat_params, overrides

# Seconds around each queued experiment's training: the DVC worker's start, the copy of the
# project, each stage's imports (~4 s a training stage on 2 CPU cores: docs/performance.md).
# Measured on 2 CPU cores: a grid of 2 on the sample study, 98 s, 13 s of it training each.
QUEUED_OVERHEAD_S = 35


class StudyError(SystemExit):
    """A step of the notebook that cannot go on: a notebook shows its one line, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


def run_dvc(*args):
    """Run `dvc ARGS` in the project, its output streamed as it comes."""
    _run(args)


def _run(args, keep=False):
    """run_dvc's work; with `keep`, returns what DVC printed."""
    status, printed = experiments.stream(args, keep)
    if status != 0:
        raise StudyError(f"dvc {' '.join(map(str, args))} failed (exit {status}): see above")
    return printed


def device_summary():
    """Where the stages will compute, and in which precision, as they decide it."""
    import torch

    from transfer_study.nn.device import (
        DTYPE_NAMES,
        autocast_dtype,
        default_device,
        featurize_dtype,
    )

    device = default_device()
    if device.type == "cuda":
        dtype = DTYPE_NAMES[autocast_dtype(device)]
        return f"GPU {torch.cuda.get_device_name(device)}: featurize and train in {dtype} autocast"
    return (
        f"no GPU: {os.cpu_count()} CPU cores featurize in {DTYPE_NAMES[featurize_dtype(device)]} "
        "and train in fp32 (on a hosted notebook, pick a GPU runtime: docs/notebook.md)"
    )


def settings(data="official", md5="official", models=(), image_sizes=None, epochs=None, extra=None):
    """The -S arguments of a study: `data` (official, or a CIFAR-10 archive's path or URL) and
    its `md5`, the `models` in the study (every other one left out), each backbone's input size
    (`image_sizes`: model -> pixels), `epochs` (train.max_epochs), and `extra` settings
    ({"train.hflip": True, ...}, as overrides() takes them)."""
    declared = workspace_params()["models"]
    unknown = [name for name in models if name not in declared]
    if unknown or not models:
        raise StudyError(f"MODELS = {list(models)}: name one or more of {', '.join(declared)}")
    chosen = {
        "data.url": data,
        "data.md5": md5,
        "models": {name: name in models for name in declared},
        **{f"{name}.image_size": size for name, size in (image_sizes or {}).items()},
    }
    if epochs is not None:
        chosen["train.max_epochs"] = epochs
    return overrides({**chosen, **(extra or {})})


def workspace_params():
    """The workspace's params.yaml, as dvc.api reads it."""
    import dvc.api

    return dvc.api.params_show()


def in_study(params):
    """The models that `params` switch on, in report order."""
    return [name for name, on in params["models"].items() if on]


def experiment(name, *args):
    """`dvc exp run -n NAME ARGS`: an earlier experiment of that name is removed first, so that
    the notebook can run again."""
    remove_experiments(lambda existing: existing == name)
    run_dvc("exp", "run", "-n", name, *args)


def remove_experiments(matches):
    """Remove the experiments of HEAD whose name `matches`."""
    names = [name for name in experiment_names() if matches(name)]
    if names:
        run_dvc("exp", "remove", *names)


def answer_table():
    """Each model in the study, in report order: its test accuracy, the kept epoch's val
    accuracy, epochs, and featurize and train seconds, read with dvc.api.metrics_show."""
    import dvc.api

    models = in_study(workspace_params())
    tested = dvc.api.metrics_show(str(paths.EVALUATE_METRICS))
    rows = []
    for name in models:
        trained = dvc.api.metrics_show(str(paths.live_summary(name)))
        featurized = paths.featurize_metrics(name)  # none for the MLP
        featurize = dvc.api.metrics_show(str(featurized)) if featurized.exists() else {}
        rows.append(
            {
                "model": name,
                "test accuracy": tested[name]["test_accuracy"],
                "val accuracy": trained["val"]["acc"],
                "epochs": trained["epochs"],
                "featurize s": featurize.get("seconds", 0.0),  # none when it fine-tunes pixels
                "train s": trained["train_seconds"],
            }
        )
    return pd.DataFrame(rows).set_index("model")


def figures(model):
    """The report's PNGs for the whole study (learning curves, cost against accuracy) and for
    `model` (its confusion matrix and most confident mistakes)."""
    names = ("learning_curves", "cost", f"confusion_{model}", f"misclassified_{model}")
    found = [paths.FIGURES_DIR / f"{name}.png" for name in names]
    missing = [str(path) for path in found if not path.exists()]
    if missing:
        raise StudyError(f"{', '.join(missing)} missing: run the study first (dvc exp run)")
    return found


def compare(*names):
    """The experiments `names` side by side from dvc.api.exp_show: the params that differ
    between them, then each model's test accuracy and kept val accuracy."""
    import dvc.api

    rows = {row["Experiment"]: row for row in dvc.api.exp_show() if row["Experiment"] in names}
    unknown = [name for name in names if name not in rows]
    if unknown:
        raise StudyError(f"no experiment named {', '.join(unknown)} (dvc exp list shows them)")
    table = pd.DataFrame([rows[name] for name in names]).set_index("Experiment")
    params = workspace_params()
    changed = [key for key in flat_params(params) if key in table and table[key].nunique() > 1]
    models = in_study(params)
    accuracies = {  # exp_show's column: ours
        column: f"{name} {what}"
        for name in models
        for column, what in (
            (f"{name}.test_accuracy", "test accuracy"),
            (f"{paths.live_summary(name)}:val.acc", "val accuracy"),
        )
        if column in table
    }
    return table[changed + list(accuracies)].rename(columns=accuracies)


def grid_estimate(table, count):
    """How long `count` queued experiments that retrain every model take, roughly: each one the
    study's own training seconds (`table`: answer_table()) and the start-up around it."""
    trained = table["train s"].sum()
    each = trained + QUEUED_OVERHEAD_S
    experiments = f"{count} experiment{'s' if count > 1 else ''}"
    return (
        f"{experiments}, one after another: roughly {_duration(count * each)} ({_duration(each)} "
        f"each: this study's {trained:.0f} s of training and ~{QUEUED_OVERHEAD_S} s of start-up; "
        "no backbone pass, the features are cached)"
    )


def _duration(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def queue_grid(name, key, values):
    """Queue one experiment per value of `key` (`dvc exp run --queue`), then run them all, one
    after another, their output streamed (`dvc exp run --run-all`). Earlier experiments named
    `name` or `name-<n>` are removed first. Returns the new experiments' names."""
    remove_experiments(lambda existing: re.fullmatch(rf"{re.escape(name)}(-\d+)?", existing))
    grid = f"{key}={','.join(map(str, values))}"
    queued = _run(("exp", "run", "--queue", *copied_results(), "-n", name, "-S", grid), keep=True)
    names = re.findall(r"Queued experiment '([^']+)'", queued)
    run_dvc("exp", "run", "--run-all")
    failed = sorted(set(names) - set(experiment_names()))
    if failed:
        raise StudyError(f"{', '.join(failed)} failed: dvc queue logs {failed[0]} tells why")
    return names


def labels_curve(baseline, names):
    """Test accuracy against labeled train images per class: each experiment's reports/cost.csv
    (`baseline`, trained on every label, and the grid `names`), read with dvc.api.read."""
    import dvc.api

    cost = str(paths.REPORT_DIR / "cost.csv")
    tables = [pd.read_csv(io.StringIO(dvc.api.read(cost, rev=rev))) for rev in (baseline, *names)]
    curve = pd.concat(tables).pivot_table(
        index="labeled_per_class", columns="model", values="test_accuracy"
    )
    curve.index = [int(n) if float(n).is_integer() else n for n in curve.index]  # 10, not 10.0
    curve.index.name = "labeled per class"
    return curve.sort_index()[tables[0]["model"]]  # the report's order, and its colours


def plot_labels_curve(curve):
    """The curve as a matplotlib figure: a line per model, labels on a log axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    figure = Figure(figsize=(6.5, 4))
    axis = figure.subplots()
    for model in curve:
        axis.plot(curve.index, curve[model], marker="o", label=model)
    axis.set(
        xscale="log",
        xlabel="labeled train images per class (log scale)",
        ylabel="test accuracy",
        title="How much transfer buys when labels are scarce",
    )
    axis.xaxis.set_major_formatter(ScalarFormatter())  # 10, 100, not 10^1, 10^2
    axis.grid(alpha=0.3)
    axis.legend()
    return figure
