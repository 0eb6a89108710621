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

FLIPPED_TRAIN = "train_flipped"  # features of the train images mirrored left-right


def split_file(split):
    return SPLIT_DIR / f"{split}.npz"


def features_file(model, split):
    return FEATURES_DIR / model / f"{split}.npy"


def features_meta(model):
    return FEATURES_DIR / model / "meta.json"


def featurize_metrics(model):
    return METRICS_DIR / f"featurize_{model}.json"


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


def workspace_root(cwd=None):
    """The project folder the user runs DVC in. A queued experiment runs in a copy of it under
    <project>/.dvc/tmp/exps/, where a relative path such as ../datasets/x.tar.gz would miss."""
    here = Path(cwd or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def user_path(path):
    """A local path from params.yaml, relative to the project folder the user runs DVC in."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else workspace_root() / path
