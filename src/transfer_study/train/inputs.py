"""What a model trains on: its train and val inputs (images or a cache), labels and batch size."""

import dataclasses

import numpy as np

from transfer_study.core import paths
from transfer_study.core.stage import UserError
from transfer_study.data.splits import draw_per_class
from transfer_study.nn.backbones import cached_inputs
from transfer_study.nn.build import data_stats, load_inputs, read_cache, read_cache_meta

MIN_EPOCH_IMAGES = 4096  # images an epoch passes over at the least, with train.per_class


@dataclasses.dataclass(frozen=True)
class TrainingInputs:
    """`train`: (inputs, labels) or (inputs, labels, the mirrored images' cached inputs), a
    train.per_class draw already repeated to an epoch; `val`: (inputs, labels). `cached`:
    "features" or "activations" (backbones.cached_inputs), None for images. `labeled`: how many
    labeled train images there are; `stats`: data_stats of those; `cache_meta`: the meta.json
    featurize wrote ({} for images)."""

    train: tuple
    val: tuple
    classes: list
    cached: str | None
    labeled: int
    batch_size: int
    stats: dict
    cache_meta: dict

    @property
    def pixels(self):
        """Whether the network learns from images (augmented on the device)."""
        return self.cached is None

    @property
    def feature_dim(self):
        return self.cache_meta.get("feature_dim")

    @property
    def activation_shape(self):
        """One image's cached activations at the cut, or None."""
        return self.cache_meta["shape"] if self.cached == "activations" else None


def load_training_inputs(name, section, seed, crop):
    """The train and val inputs of model `name` (its `section`), with train.per_class drawn by
    `seed` and the shared train.crop `crop`."""
    train = section.train
    cached = cached_inputs(name, section, crop)
    train_x, train_data = load_inputs(name, cached, "train")
    val_x, val_data = load_inputs(name, cached, "val")
    train_y, classes = train_data.labels, train_data.classes
    drawn, labeled, batch_size = None, train_data.images, train.batch_size
    if train.per_class is not None:
        key = f"{name}.train.per_class"
        drawn = draw_per_class(train_y, classes, train.per_class, seed, key)
        labeled = train_data.images[drawn]
        batch_size = min(batch_size, len(drawn))  # 10 images of 10 classes: batches of 100
    elif train.batch_size > len(train_y):
        raise UserError(
            f"{name}.train.batch_size = {train.batch_size} is larger than the train split "
            f"({len(train_y)} images); lower it or raise data.train_size"
        )
    cache_meta = {} if cached is None else _cache_meta(name, cached, section)
    train_split = (train_x, train_y)
    if cached is not None and train.hflip:
        train_split += (_flipped_cache(name, len(train_y)),)
    if drawn is not None:
        # A small draw is passed over several times an epoch (an epoch is at least
        # MIN_EPOCH_IMAGES images), so that max_epochs and patience count comparable optimizer
        # steps at every size.
        chosen = np.tile(drawn, -(-MIN_EPOCH_IMAGES // len(drawn)))
        train_split = tuple(array[chosen] for array in train_split)
    return TrainingInputs(
        train=train_split,
        val=(val_x, val_data.labels),
        classes=classes,
        cached=cached,
        labeled=len(labeled),
        batch_size=batch_size,
        stats=data_stats(labeled),  # of the labeled images only
        cache_meta=cache_meta,
    )


def _cache_meta(name, cached, section):
    """The meta file featurize_<name> wrote, once it is the cache this training reads."""
    meta = read_cache_meta(name)
    cut = section.trainable_layers if cached == "activations" else 0
    if meta.get("inputs", "features") != cached or meta.get("trainable_layers", 0) != cut:
        raise UserError(
            f"features/{name} holds the cache of another {name}.trainable_layers or train.crop: "
            f"rerun featurize_{name} (dvc repro featurize_{name})"
        )
    return meta


def _flipped_cache(name, rows):
    """The cached features or activations of the mirrored train images."""
    path = paths.features_file(name, paths.FLIPPED_TRAIN)
    if not path.exists():
        raise UserError(
            f"{name}.train.hflip is true but {path} is missing: set the shared train.hflip: true "
            f"so that featurize_{name} caches the mirrored train images' features"
        )
    return read_cache(name, paths.FLIPPED_TRAIN, rows)
