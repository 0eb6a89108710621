"""Where each stage reads and writes, relative to the project root (mirrored by dvc.yaml)."""

from pathlib import Path

RAW_DIR = Path("data/raw")  # the dataset's files as downloaded
SPLIT_DIR = Path("data/split")
FEATURES_DIR = Path("features")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORT_DIR = Path("reports")
CHECKPOINTS_DIR = Path("checkpoints")  # training in progress; not a DVC output (git-ignored)


def split_file(split):
    return SPLIT_DIR / f"{split}.npz"


def features_file(model, split):
    return FEATURES_DIR / model / f"{split}.npy"


def features_meta(model):
    return FEATURES_DIR / model / "meta.json"


def model_file(model):
    return MODELS_DIR / f"{model}.pt"


def train_metrics(model):
    return METRICS_DIR / f"train_{model}.json"


def history_file(model):
    return PLOTS_DIR / "history" / f"{model}.csv"


def confusion_file(model):
    return PLOTS_DIR / "confusion" / f"{model}.csv"


def checkpoint_dir(model):
    return CHECKPOINTS_DIR / model
