"""The study's report: a comparison table, learning curves, confusions, misclassified images."""

import json

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
from matplotlib.ticker import MaxNLocator

from . import layout
from .atomic import atomic_path, write_text
from .data import load_split

GRID = (4, 6)  # rows x columns of misclassified test images per model


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


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


def write_report(models, out_dir=layout.REPORT_DIR):
    """reports/report.md and its PNGs, for the models in `models`."""
    evaluation = json.loads((layout.METRICS_DIR / "evaluate.json").read_text())
    test = load_split(layout.split_file("test"))
    rows, histories = [], {}
    for name in models:
        train = json.loads(layout.train_metrics(name).read_text())
        histories[name] = pd.read_csv(layout.history_file(name))
        # Class names stay strings, even digits (MNIST's "0".."9").
        predictions = pd.read_csv(
            layout.confusion_file(name), dtype={"actual": str, "predicted": str}
        )
        confusion_plot(name, predictions, test.classes, out_dir / f"confusion_{name}.png")
        misclassified_grid(name, predictions, test.images, out_dir / f"misclassified_{name}.png")
        rows.append(
            {
                "model": name,
                "test accuracy": f"{evaluation[name]['test_accuracy']:.2%}",
                "best val accuracy": f"{train['best_val_accuracy']:.2%}",
                "epochs": train["epochs"],
                "train time (s)": f"{train['train_seconds']:.1f}",
                "trainable params": f"{train['trainable_params']:,}",
                "total params": f"{train['total_params']:,}",
            }
        )
    learning_curves(histories, out_dir / "learning_curves.png")
    write_text(out_dir / "report.md", _markdown(rows, models, len(test.labels)))


def _markdown(rows, models, test_size):
    header = list(rows[0])
    lines = [
        "# CIFAR-10: MLP against ImageNet transfer learning",
        "",
        f"Test split: {test_size} images. Train time covers fitting only; featurization of the",
        "frozen backbones is a separate, cached stage (see metrics/featurize_*.json).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows),
        "",
        "## Learning curves",
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    for name in models:
        lines += [
            f"## {name}",
            "",
            f"![confusion {name}](confusion_{name}.png)",
            "",
            f"![misclassified {name}](misclassified_{name}.png)",
            "",
        ]
    return "\n".join(lines)
