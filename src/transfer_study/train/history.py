"""The epoch history: one row per epoch, from Lightning's CSV logs of a run's attempts."""

import pandas as pd

COLUMNS = {
    "train/loss": "train_loss",
    "train/acc": "train_acc",
    "val/loss": "val_loss",
    "val/acc": "val_acc",
}  # the name the module logs -> the history's column


def epoch_history(csv_paths):
    """Lightning's CSV logs (train and val rows apart; one file per attempt, a resumed run's
    last) -> one row per epoch, 1-based."""
    log = pd.concat([pd.read_csv(path) for path in csv_paths], ignore_index=True)
    history = log.groupby("epoch")[list(COLUMNS)].last().rename(columns=COLUMNS).reset_index()
    history["epoch"] += 1
    return history


def logged_history(checkpoints):
    """The history logged under the checkpoint folder so far, or None before any epoch's log."""
    logs = sorted(checkpoints.glob("logs/version_*/metrics.csv"))
    return epoch_history(logs) if logs else None


def kept_epoch(history):
    """The history's row of the epoch whose weights the model keeps: the lowest val loss, as
    ModelCheckpoint judged."""
    return history.loc[history["val_loss"].idxmin()]
