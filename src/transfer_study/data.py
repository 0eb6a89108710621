"""CIFAR-10 archive reader, seeded stratified splits, and the per-split uint8 files."""

import codecs
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import UserError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # uint8, N x 3 x H x W
    labels: np.ndarray  # int64, N
    classes: tuple  # class names, indexed by label


def _allowed_globals():
    """What CIFAR's pickles may reference: numpy array reconstruction, and `_codecs.encode`,
    which protocol-2 pickles written by Python 3 use for bytes. Nothing here runs code."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    numpy_names = {
        "_reconstruct": multiarray._reconstruct,
        "scalar": multiarray.scalar,
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }
    allowed = {("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy"):
        allowed.update({(module, name): obj for name, obj in numpy_names.items()})
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR's batches (dicts of numpy arrays); refuses any other global, so a crafted
    pickle cannot run code."""

    allowed = _allowed_globals()

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data, member):
    try:
        # The official files were pickled by Python 2: strings come back as bytes.
        return _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:
        raise UserError(f"{member} is not a CIFAR batch ({error})") from None


def _key(batch, name):
    return batch.get(name.encode(), batch.get(name))


def read_cifar10(archive):
    """Read the official CIFAR-10 python archive (or a mirror of it) without extracting it.

    Returns (train Split, test Split). Members are read in memory by name, so no path inside the
    archive is ever written to disk.
    """
    wanted = {*TRAIN_BATCHES, TEST_BATCH, META}
    found = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = Path(member.name).name
                if member.isfile() and name in wanted:
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"{archive} is not a readable tar archive ({error})") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise UserError(f"{archive} lacks CIFAR-10 members: {', '.join(missing)}")
    meta = _unpickle(found[META], META)
    classes = tuple(_decode(name) for name in _key(meta, "label_names"))

    def load(names):
        batches = [_unpickle(found[name], name) for name in names]
        data = np.concatenate([np.asarray(_key(b, "data"), dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(_key(b, "labels"), dtype=np.int64) for b in batches])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
            raise UserError(f"{archive}: batches are not N x 3072 pixels with N labels")
        if labels.min() < 0 or labels.max() >= len(classes):
            raise UserError(f"{archive}: labels outside 0..{len(classes) - 1}")
        return Split(data.reshape(-1, 3, 32, 32), labels, classes)

    return load(TRAIN_BATCHES), load([TEST_BATCH])


def _decode(name):
    return name.decode() if isinstance(name, bytes) else str(name)


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
    """Seeded stratified train/val split of the train set, with optional stratified caps."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(train.labels))
    if train_size is not None and train_size < len(pool):
        pool = stratified_sample(train.labels, train_size, rng)
    val_in_pool = stratified_sample(train.labels[pool], round(len(pool) * val_fraction), rng)
    is_val = np.zeros(len(pool), dtype=bool)
    is_val[val_in_pool] = True
    test_idx = np.arange(len(test.labels))
    if test_size is not None and test_size < len(test_idx):
        test_idx = stratified_sample(test.labels, test_size, rng)
    return {
        "train": _subset(train, pool[~is_val]),
        "val": _subset(train, pool[is_val]),
        "test": _subset(test, test_idx),
    }


def _subset(split, idx):
    return Split(split.images[idx], split.labels[idx], split.classes)


def save_split(split, path):
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, images=split.images, labels=split.labels, classes=np.array(split.classes))


def load_split(path):
    with np.load(path, allow_pickle=False) as data:
        return Split(data["images"], data["labels"], tuple(str(c) for c in data["classes"]))


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
