"""Where each stage reads and writes, relative to the project root (mirrored by dvc.yaml)."""

from pathlib import Path

RAW_DIR = Path("data/raw")  # the dataset's files as downloaded
SPLIT_DIR = Path("data/split")
FEATURES_DIR = Path("features")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
PREDICTIONS_DIR = Path("predictions")  # each test image's prediction, per model
EVALUATE_METRICS = METRICS_DIR / "evaluate.json"  # test accuracy and loss per model
REPORT_DIR = Path("reports")
FIGURES_DIR = REPORT_DIR / "figures"  # the report's PNGs; dvc plots shows them as images
CHECKPOINTS_DIR = Path("checkpoints")  # training in progress; not a DVC output (git-ignored)

FLIPPED_TRAIN = "train_flipped"  # features of the train images mirrored left-right
FLIPPED_TEST = "test_flipped"  # and of the test images, for evaluate.hflip


def split_file(split):
    return SPLIT_DIR / f"{split}.npz"


def features_dir(model):
    """featurize_<model>'s cache: one set, rewritten whole."""
    return FEATURES_DIR / model


def features_file(model, split):
    return features_dir(model) / f"{split}.npy"


def features_meta(model):
    return features_dir(model) / "meta.json"


def featurize_metrics(model):
    return METRICS_DIR / f"featurize_{model}.json"


def model_file(model):
    return MODELS_DIR / f"{model}.pt"


def train_metrics(model):
    return METRICS_DIR / f"train_{model}.json"


def live_dir(model):
    """DVCLive's folder for a training stage: its summary is the model's headline metrics."""
    return Path("dvclive") / model


def live_summary(model):
    return live_dir(model) / "metrics.json"  # where DVCLive writes its summary


def history_file(model):
    return PLOTS_DIR / "history" / f"{model}.csv"


def predictions_file(model):
    return PREDICTIONS_DIR / f"{model}.csv"


def checkpoint_dir(model):
    return CHECKPOINTS_DIR / model


def workspace_root():
    """The project folder the user runs DVC in. A queued experiment runs in a copy of it under
    <project>/.dvc/tmp/exps/, where a relative path such as ../datasets/x.tar.gz would miss."""
    here = Path.cwd().resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def user_path(path):
    """A local path from params.yaml: as written if it exists from here (the copy of a queued
    experiment holds the project's own files), else from the project folder the user runs DVC
    in (a path that leaves the project, such as ../datasets/x.tar.gz)."""
    path = Path(path)
    try:
        path = path.expanduser()
    except RuntimeError:  # ~nosuchuser/...: no home to expand; the path stays as written
        pass
    if path.is_absolute() or path.exists():
        return path
    return workspace_root() / path
