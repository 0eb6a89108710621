"""Markers: what a left-out model's stages write (DVC wants every output), without torch."""

import json

from transfer_study.core import paths
from transfer_study.core.atomic import write_json, write_text

SKIPPED = {"skipped": True}
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")  # plots/history/


def skip_featurize(name):
    """featurize_<name>'s outputs, without a backbone pass."""
    write_json(paths.features_meta(name), SKIPPED)
    write_json(paths.featurize_metrics(name), SKIPPED)


def skip_training(name):
    """train_<name>'s outputs, without training: markers in place of the model file and the
    train metrics, a DVCLive summary with no figure (a metrics file of dvc.yaml: `dvc exp show`
    would give a `skipped` column to each left-out model), and a history with no epochs."""
    write_json(paths.model_file(name), SKIPPED)
    write_json(paths.train_metrics(name), SKIPPED)
    write_json(paths.live_summary(name), {})
    write_text(paths.history_file(name), ",".join(HISTORY_COLUMNS) + "\n")


def is_skipped(path):
    """Whether `path` holds a marker (only its first bytes are read: a model file is large)."""
    with open(path, "rb") as file:
        head = file.read(64)
    try:
        return json.loads(head) == SKIPPED
    except ValueError:  # binary or longer: a real file
        return False
