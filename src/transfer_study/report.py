"""The study's report: table, cost, learning curves, per-class accuracy, confusions, mistakes."""

import json
import sys
import warnings

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import font_manager
from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

from transfer_study.core import paths
from transfer_study.core.atomic import atomic_path, write_text
from transfer_study.data.splits import load_split

GRID = (4, 6)  # rows x columns of misclassified test images per model


def _save(fig, path):
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # One per character and figure otherwise; write_report says it once (missing_glyphs).
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def missing_glyphs(names):
    """The characters of `names` (class names of a folder dataset: any script, emoji) that the
    figures' font cannot draw: they show as boxes."""
    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    return sorted(
        {c for name in names for c in name if c.isprintable() and not font.get_char_index(ord(c))}
    )


def learning_curves(histories, path):
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for (name, history), color in zip(histories.items(), matplotlib.colormaps["tab10"].colors):
        for axis, metric in zip(axes, ("loss", "acc")):
            axis.plot(history["epoch"], history[f"val_{metric}"], color=color, label=f"{name} val")
            axis.plot(
                history["epoch"],
                history[f"train_{metric}"],
                color=color,
                ls="--",
                label=f"{name} train",
            )
    for axis, title in zip(axes, ("cross-entropy loss", "accuracy")):
        axis.set(xlabel="epoch", title=title)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    _save(fig, path)


def confusion_plot(name, predictions, classes, path):
    k = len(classes)
    index = {c: i for i, c in enumerate(classes)}
    actual = predictions["actual"].map(index).to_numpy()
    predicted = predictions["predicted"].map(index).to_numpy()
    counts = np.bincount(actual * k + predicted, minlength=k * k).reshape(k, k)
    fig = Figure(figsize=(6.5, 5.5))
    axis = fig.subplots()
    image = axis.imshow(
        counts / np.maximum(counts.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1
    )
    for i in range(k):
        for j in range(k):
            axis.text(
                j,
                i,
                counts[i, j],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if i == j else "black",
            )
    axis.set(
        xticks=range(k),
        yticks=range(k),
        xlabel="predicted",
        ylabel="actual",
        title=f"{name}: test confusion (colour: share of the actual class)",
    )
    axis.set_xticklabels(classes, rotation=45, ha="right")
    axis.set_yticklabels(classes)
    fig.colorbar(image, ax=axis, fraction=0.046)
    _save(fig, path)


def misclassified_grid(name, predictions, images, path):
    """The most confident mistakes first: they say most about what the model learned."""
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    wrong = wrong.sort_values("confidence", ascending=False).head(GRID[0] * GRID[1])
    fig = Figure(figsize=(GRID[1] * 1.7, GRID[0] * 1.9))
    axes = fig.subplots(*GRID)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (i, row) in zip(axes.flat, wrong.iterrows()):
        pixels = images[i].transpose(1, 2, 0)
        if pixels.shape[2] == 1:  # grayscale (MNIST)
            axis.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            axis.imshow(pixels)
        axis.set_title(f"{row.predicted} {row.confidence:.0%}\n(is {row.actual})", fontsize=7)
    fig.suptitle(f"{name}: misclassified test images, most confident first", fontsize=9)
    _save(fig, path)


def cost_plot(cost, path):
    """Test accuracy against compute seconds: what each model buys, at what cost."""
    fig = Figure(figsize=(6.5, 4.5))
    axis = fig.subplots()
    colors = matplotlib.colormaps["tab10"].colors
    for (_, row), color in zip(cost.iterrows(), colors):
        axis.scatter(row.seconds, row.test_accuracy, color=color, s=60, label=row.model)
        axis.annotate(
            row.model,
            (row.seconds, row.test_accuracy),
            xytext=(6, 4),
            fontsize=8,
            textcoords="offset points",
        )
    axis.set(
        xscale="log",
        xlabel="compute seconds (featurize + train, log scale)",
        ylabel="test accuracy",
        title="What each model buys, at what cost",
    )
    axis.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 10, 20, 50, 100, ...
    axis.xaxis.set_major_formatter(ScalarFormatter())  # 20, not 2 x 10^1
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.margins(x=0.2, y=0.15)  # room for the labels
    axis.grid(alpha=0.3)
    _save(fig, path)


def study_tables(seconds, labeled, evaluation, histories, predictions, classes):
    """The data of the study's plots, one row per model (and epoch, split or class), for
    `dvc plots`: curves (model, split, epoch, accuracy, loss), cost (model, seconds,
    labeled_per_class, test_accuracy) and per-class accuracy (model, class, accuracy).
    `seconds`: model -> compute seconds, in report order; `labeled`: model -> labeled train
    images per class; `classes`, in label order (per-class rows follow it)."""
    curves = pd.concat(
        [
            pd.DataFrame(
                {
                    "model": name,
                    "split": split,
                    "epoch": history["epoch"],
                    "accuracy": history[f"{split}_acc"],
                    "loss": history[f"{split}_loss"],
                }
            )
            for name, history in histories.items()
            for split in ("train", "val")
        ],
        ignore_index=True,
    )
    cost = pd.DataFrame(
        {
            "model": list(seconds),
            "seconds": [round(s, 2) for s in seconds.values()],
            "labeled_per_class": [labeled[m] for m in seconds],
            "test_accuracy": [evaluation[m]["test_accuracy"] for m in seconds],
        }
    )
    per_class = pd.concat(
        [
            table.assign(right=table["actual"] == table["predicted"])
            .groupby(pd.Categorical(table["actual"], categories=classes), observed=False)["right"]
            .mean()
            .rename("accuracy")
            .rename_axis("class")
            .reset_index()
            .assign(model=name)[["model", "class", "accuracy"]]
            for name, table in predictions.items()
        ],
        ignore_index=True,
    )
    return {"curves": curves, "cost": cost, "per_class": per_class}


def _kept(history, train):
    """The history row of the epoch whose weights the model keeps."""
    return history[history["epoch"] == train["kept_epoch"]].iloc[0]


def compute_seconds(name, train):
    """Featurize plus train seconds of a model (`train`: its train metrics); a model whose
    featurize stage did no work counts its training alone."""
    featurize = paths.featurize_metrics(name)
    seconds = json.loads(featurize.read_text()).get("seconds", 0) if featurize.exists() else 0
    return train["train_seconds"] + seconds


def write_report(models, out_dir=paths.REPORT_DIR):
    """reports/report.md, its PNGs (reports/figures/) and the study's plot data (reports/*.csv),
    for the models in `models`."""
    evaluation = json.loads(paths.EVALUATE_METRICS.read_text())
    test = load_split(paths.split_file("test"))
    if missing := missing_glyphs(test.classes):
        print(
            f"report: the figures' font has no glyph for {' '.join(missing[:20])} (class names):"
            " they show as boxes in the figures; report.md and the CSVs keep them",
            file=sys.stderr,
        )
    figures = out_dir / paths.FIGURES_DIR.relative_to(paths.REPORT_DIR)
    rows, histories, predictions, seconds, labeled = [], {}, {}, {}, {}
    for name in models:
        train = json.loads(paths.train_metrics(name).read_text())
        histories[name] = pd.read_csv(paths.history_file(name))
        # Class names stay strings, even digits (MNIST's "0".."9").
        predictions[name] = pd.read_csv(
            paths.predictions_file(name), dtype={"actual": str, "predicted": str}
        )
        seconds[name] = compute_seconds(name, train)
        # train.per_class, or the split's mean (all of CIFAR-10's 40,500: 4,050)
        labeled[name] = train["per_class"] or round(train["train_images"] / len(test.classes), 1)
        confusion_plot(name, predictions[name], test.classes, figures / f"confusion_{name}.png")
        misclassified_grid(
            name, predictions[name], test.images, figures / f"misclassified_{name}.png"
        )
        rows.append(
            {
                "model": name,
                "test accuracy": f"{evaluation[name]['test_accuracy']:.2%}",
                # 4,050 for a whole mean (not 4,050.0), 812.5 otherwise
                "labeled per class": f"{labeled[name]:,.1f}".removesuffix(".0"),
                "compute (s)": f"{seconds[name]:.1f}",
                # The kept epoch's, as in its DVCLive summary.
                "val accuracy": f"{_kept(histories[name], train)['val_acc']:.2%}",
                "epochs": train["epochs"],
                "train time (s)": f"{train['train_seconds']:.1f}",
                "trainable params": f"{train['trainable_params']:,}",
                "total params": f"{train['total_params']:,}",
            }
        )
    tables = study_tables(seconds, labeled, evaluation, histories, predictions, test.classes)
    for table_name, table in tables.items():
        with atomic_path(out_dir / f"{table_name}.csv") as tmp:
            table.to_csv(tmp, index=False)
    learning_curves(histories, figures / "learning_curves.png")
    cost_plot(tables["cost"], figures / "cost.png")
    per_class = tables["per_class"].pivot(index="class", columns="model", values="accuracy")
    text = _markdown(rows, per_class.reindex(test.classes)[list(models)], models, len(test.labels))
    write_text(out_dir / "report.md", text)


def _table(header, rows):
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def _markdown(rows, per_class, models, test_size):
    header = list(rows[0])
    folder = paths.FIGURES_DIR.relative_to(paths.REPORT_DIR)
    lines = [
        "# CIFAR-10: MLP against ImageNet transfer learning",
        "",
        f"Test split: {test_size} images. Compute is the model's featurize stage (the frozen",
        "backbone's passes over every split, cached) plus its training, without process start;",
        "train time is the training alone.",
        "",
        *_table(header, ([row[h] for h in header] for row in rows)),
        "",
        "## What each model buys, at what cost",
        "",
        f"![cost]({folder}/cost.png)",
        "",
        "## Learning curves",
        "",
        f"![learning curves]({folder}/learning_curves.png)",
        "",
        "## Test accuracy per class",
        "",
        *_table(
            ["class", *models],
            # "-": a class without test images.
            (
                [c, *("-" if pd.isna(a) else f"{a:.1%}" for a in row)]
                for c, row in per_class.iterrows()
            ),
        ),
        "",
    ]
    for name in models:
        lines += [
            f"## {name}",
            "",
            f"![confusion {name}]({folder}/confusion_{name}.png)",
            "",
            f"![misclassified {name}]({folder}/misclassified_{name}.png)",
            "",
        ]
    return "\n".join(lines)
