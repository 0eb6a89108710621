"""Seeded stratified splits, and the per-split uint8 files every later stage reads."""

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer_study.core.atomic import atomic_path
from transfer_study.core.stage import UserError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # uint8, N x C x H x W (C = 3, or 1 for grayscale)
    labels: np.ndarray  # int64, N
    classes: tuple  # class names, indexed by label


def stratified_sample(labels, n, rng):
    """Sorted indices of `n` items drawn so that each class keeps its share (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(int)
    # Hand out what flooring left over to the classes that lost the most.
    for i in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[i] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota)
    ]
    return np.sort(np.concatenate(chosen))


def make_splits(train, test, val_fraction, seed, train_size=None, test_size=None):
    """Seeded stratified train/val split of the train set, with optional stratified caps.

    `test` None (a folder of images without a test/ folder): the test set is drawn from `train`
    first, stratified, with the same share as the val set.
    """
    classes_present = np.unique(train.labels)
    if len(classes_present) < 2:
        raise UserError(
            f"the dataset has a single class ({train.classes[classes_present[0]]}): "
            "a classifier needs images of at least two classes"
        )
    rng = np.random.default_rng(seed)
    pool = np.arange(len(train.labels))
    if test is None:
        held_out = stratified_sample(train.labels, round(len(pool) * val_fraction), rng)
        test = _subset(train, held_out)
        pool = np.setdiff1d(pool, held_out)
    if train_size is not None and train_size < len(pool):
        pool = pool[stratified_sample(train.labels[pool], train_size, rng)]
    val_in_pool = stratified_sample(train.labels[pool], round(len(pool) * val_fraction), rng)
    is_val = np.zeros(len(pool), dtype=bool)
    is_val[val_in_pool] = True
    test_idx = np.arange(len(test.labels))
    if test_size is not None and test_size < len(test_idx):
        test_idx = stratified_sample(test.labels, test_size, rng)
    splits = {
        "train": _subset(train, pool[~is_val]),
        "val": _subset(train, pool[is_val]),
        "test": _subset(test, test_idx),
    }
    for name, split in splits.items():
        _check_every_class(name, split, classes_present)
    return splits


# What raises a split's images per class (a folder without test/ draws test by val_fraction too).
_MORE_IMAGES = {
    "train": "lower data.val_fraction or raise data.train_size",
    "val": "raise data.val_fraction or data.train_size",
    "test": "raise data.test_size (or data.val_fraction for a folder without test/)",
}


def _check_every_class(name, split, classes):
    """Early stopping needs val images, scores need test images: of every class, in every split."""
    missing = sorted(set(classes.tolist()) - set(split.labels.tolist()))
    if missing:
        raise UserError(
            f"the {name} split has no image of class {split.classes[missing[0]]!r} "
            f"({len(split.labels)} images for {len(classes)} classes): {_MORE_IMAGES[name]}, "
            "or add images"
        )


def draw_per_class(labels, classes, per_class, seed, key):
    """Sorted indices of `per_class` items of each class, seeded and nested: each class's items
    are put in one random order by `seed` (whatever `per_class`), and the first `per_class`
    taken, so that the draw of 10 lies inside the draw of 100. `key` names the param."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == label) for label in range(len(classes))]
    fewest = min(range(len(classes)), key=lambda label: len(members[label]))
    if per_class > len(members[fewest]):
        raise UserError(
            f"{key} = {per_class}: class {classes[fewest]!r} has {len(members[fewest])} train "
            f"images; use at most {len(members[fewest])}, or null for every image"
        )
    return np.sort(np.concatenate([rng.permutation(m)[:per_class] for m in members]))


def channel_stats(images):
    """(mean, std) per channel of uint8 N x C x H x W images, on the 0-1 scale."""
    channels = [images[:, c].astype(np.float64) / 255 for c in range(images.shape[1])]
    return tuple(float(x.mean()) for x in channels), tuple(float(x.std()) for x in channels)


def _subset(split, idx):
    return Split(split.images[idx], split.labels[idx], split.classes)


def save_split(split, path):
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, images=split.images, labels=split.labels, classes=np.array(split.classes))


def require_file(path, stage):
    """Stop with one line naming the stage that writes `path` unless it exists."""
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: run the {stage} stage first (dvc repro {stage})")


def read_array_file(path, stage):
    """np.load of a .npy or .npz file an earlier stage wrote (never a pickle); missing or
    damaged, one line naming the file and the stage that makes it."""
    require_file(path, stage)
    try:
        loaded = np.load(path, allow_pickle=False)
        return dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        why = " ".join(str(error).split())[:120] or type(error).__name__
        if "pickle" in why:  # numpy reads any other file as a pickle, which it never loads here
            why = "not a numpy .npy or .npz file"
        raise UserError(
            f"{path} is damaged ({why}); rerun {stage} (dvc repro {stage}) or dvc checkout {path}"
        ) from None


def load_split(path):
    """The Split in a file save_split wrote, its arrays checked for what later stages assume."""
    data = read_array_file(path, "split")
    images, labels, classes = (data.get(key) for key in ("images", "labels", "classes"))
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 4
        or not isinstance(labels, np.ndarray)
        or labels.dtype.kind not in "iu"
        or labels.shape != images.shape[:1]
        or not isinstance(classes, np.ndarray)
        or classes.ndim != 1
        or (len(labels) and not 0 <= labels.min() <= labels.max() < len(classes))
    ):
        raise UserError(
            f"{path} does not hold a split as the split stage writes it (uint8 images, labels, "
            "classes); rerun it: dvc repro split"
        )
    return Split(images, labels.astype(np.int64), tuple(str(c) for c in classes))


def split_counts(splits):
    """{split: {"total": n, class name: n, ...}} for metrics/split.json."""
    counts = {}
    for name, split in splits.items():
        per_class = np.bincount(split.labels, minlength=len(split.classes))
        counts[name] = {
            "total": int(len(split.labels)),
            **{c: int(n) for c, n in zip(split.classes, per_class)},
        }
    return counts
