"""The dataset readers: CIFAR-10's python archive, MNIST's idx files, image folders -> Splits."""

import codecs
import gzip
import io
import pickle
import struct
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from transfer_study.core.catalog import DATASETS
from transfer_study.core.progress import progress
from transfer_study.core.stage import UserError
from transfer_study.data.images import (
    IMAGE_SUFFIXES,
    UNREADABLE_IMAGE,
    images_below,
    is_hidden,
    read_image,
)
from transfer_study.data.splits import Split

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"


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


MEMBER_DIR = "cifar-10-batches-py"  # where the official archive keeps its members
MAX_MEMBER_BYTES = 64 << 20  # an official batch is 30 MB; a larger member is refused unread
PIXELS = 3 * 32 * 32  # values per CIFAR image row


def read_cifar10(archive):
    """Read the official CIFAR-10 python archive (or a mirror of it) without extracting it.

    Returns (train Split, test Split). Members are read in memory at their official paths
    (cifar-10-batches-py/<name>), each at most MAX_MEMBER_BYTES, so no path inside the archive is
    ever written to disk; even so, an archive holding a link, an absolute path or a `..` member
    is refused, as an extractor would have to. Every batch's structure is checked.
    """
    wanted = {f"{MEMBER_DIR}/{name}": name for name in (*TRAIN_BATCHES, TEST_BATCH, META)}
    found = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _check_member(archive, member)
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue
                if name in found:
                    raise UserError(f"{archive}: member {member.name} appears twice")
                if member.size > MAX_MEMBER_BYTES:
                    raise UserError(
                        f"{archive}: member {member.name} holds {member.size:,} bytes; a CIFAR "
                        f"batch holds about 30 MB (refused unread above {MAX_MEMBER_BYTES:,})"
                    )
                found[name] = tar.extractfile(member).read()
    except tarfile.ReadError:  # tarfile's message lists each compression it tried, a line each
        raise UserError(f"{archive} is not a tar archive (plain, gzip, bz2 or xz)") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        why = " ".join(str(error).split())  # one line, whatever the library wrote
        raise UserError(f"{archive} is not a readable tar archive ({why})") from None
    missing = [f"{MEMBER_DIR}/{n}" for n in wanted.values() if n not in found]
    if missing:
        raise UserError(f"{archive} lacks CIFAR-10 members: {', '.join(missing)}")
    classes = _class_names(_unpickle(found[META], META), archive)

    def load(names):
        batches = [
            _batch(_unpickle(found[name], name), name, archive, len(classes)) for name in names
        ]
        data = np.concatenate([data for data, _ in batches])
        labels = np.concatenate([labels for _, labels in batches])
        if not len(labels):
            raise UserError(f"{archive}: {', '.join(names)} hold no images")
        return Split(data.reshape(-1, 3, 32, 32), labels, classes)

    return load(TRAIN_BATCHES), load([TEST_BATCH])


def _class_names(meta, archive):
    names = _key(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) < 2:
        raise UserError(f"{archive}: {META} has no list of label_names (at least two classes)")
    return tuple(_decode(name) for name in names)


def _batch(batch, name, archive, num_classes):
    """(uint8 N x 3072 pixels, int64 N labels) of one unpickled batch, its structure checked."""
    where = f"{archive}: {MEMBER_DIR}/{name}"
    if not isinstance(batch, dict):
        raise UserError(f"{where} is a {type(batch).__name__}, not a dict of data and labels")
    data, labels = _key(batch, "data"), _key(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise UserError(f"{where}: data is not a 2-d uint8 array (N images x {PIXELS} pixels)")
    if data.shape[1] != PIXELS:
        raise UserError(f"{where}: data rows hold {data.shape[1]} values, not {PIXELS}")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise UserError(f"{where}: expected {len(data)} labels, one per image")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: labels are not integers") from None
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{where}: labels outside 0..{num_classes - 1}")
    return data, labels


def _decode(name):
    return name.decode() if isinstance(name, bytes) else str(name)


def _check_member(archive, member):
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise UserError(f"{archive}: member {member.name} points outside the archive; refusing it")
    if member.issym() or member.islnk():
        raise UserError(f"{archive}: member {member.name} is a link; refusing it")


MNIST_CLASSES = tuple(str(digit) for digit in range(10))


def _read_idx(path, ndim):
    """An idx file (gzipped, as MNIST ships it) of uint8 data with `ndim` dimensions."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path} is not a readable .gz file ({error})") from None
    # Header: two zero bytes, type code 0x08 (uint8), ndim, then ndim big-endian uint32 sizes.
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\0\0\x08" or data[3] != ndim:
        raise UserError(f"{path} is not an idx file of {ndim}-d uint8 data")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != np.prod(shape):
        raise UserError(f"{path} holds {body.size} values, its header promises {shape}")
    return body.reshape(shape)


def read_mnist(folder):
    """(train Split, test Split) from MNIST's four idx files; images are N x 1 x 28 x 28."""

    def load(prefix):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 3)
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 1).astype(np.int64)
        if len(images) != len(labels) or labels.max(initial=0) >= len(MNIST_CLASSES):
            raise UserError(f"{folder}: {prefix} images and labels do not match")
        return Split(images[:, None], labels, MNIST_CLASSES)

    return load("train"), load("t10k")


def _refuse_linked_folder(path):
    """DVC hashes data.path without entering linked folders, so a change inside one would never
    rerun split: refuse it rather than read what DVC cannot see."""
    raise UserError(
        f"{path} is a link to a folder, which DVC does not look into (a change there would not "
        "rerun split); copy the folder into data.path instead (links to image files are fine)"
    )


def read_folder(root, image_size, bad_images="fail"):
    """(train Split, test Split or None, unreadable files skipped) from `<class>/<image>` folders,
    or `train/<class>/...` and `test/<class>/...`; a class's images may lie in subfolders of its
    folder (the images_below rule). Each image is decoded once, turned upright by its EXIF
    orientation, converted to RGB and resized to image_size x image_size pixels.

    `bad_images`: "fail" stops at the first unreadable image, naming it; "skip" leaves it out.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.path = {root}: no such folder")
    skipped = []
    if not (root / "train").is_dir():
        return _read_classes(root, image_size, bad_images, skipped), None, skipped
    train = _read_classes(root / "train", image_size, bad_images, skipped)
    test = None
    if (root / "test").is_dir():
        test = _read_classes(root / "test", image_size, bad_images, skipped, train.classes)
    return train, test, skipped


def _read_classes(folder, image_size, bad_images, skipped, classes=None):
    if folder.is_symlink():
        _refuse_linked_folder(folder)
    entries = sorted(p for p in folder.iterdir() if not is_hidden(p.name) and p.is_dir())
    for linked in (p for p in entries if p.is_symlink()):
        _refuse_linked_folder(linked)
    found = [p.name for p in entries]
    if not found:
        raise UserError(f"{folder} has no class folders: expected {folder}/<class>/<image>.jpg")
    if classes is not None and not set(found) <= set(classes):
        extra = ", ".join(sorted(set(found) - set(classes)))
        raise UserError(f"{folder} has classes that train/ lacks: {extra}")
    classes = tuple(classes or found)
    files = {}
    for name in found:
        files[name], linked_folders = images_below(folder / name)
        for linked in linked_folders:
            _refuse_linked_folder(linked)
        if not files[name]:
            suffixes = ", ".join(IMAGE_SUFFIXES)
            raise UserError(f"class folder {folder / name} holds no images ({suffixes})")
    images, labels = [], []
    total = sum(len(paths) for paths in files.values())
    with progress(total, f"decode {folder.name}") as bar:
        for name, paths in files.items():
            for path in paths:
                pixels = _decode_image(path, image_size, bad_images)
                bar.update()
                if pixels is None:
                    skipped.append(str(path))
                    continue
                images.append(pixels)
                labels.append(classes.index(name))
    if not images:
        raise UserError(f"{folder}: no readable images")
    return Split(np.stack(images), np.array(labels, dtype=np.int64), classes)


def _decode_image(path, image_size, bad_images):
    """uint8 3 x size x size pixels of one image file, or None if unreadable and skipped."""
    try:
        return read_image(path, (3, image_size, image_size))
    except UNREADABLE_IMAGE as error:
        if bad_images == "skip":
            return None
        raise UserError(
            f"cannot read image {path} ({error}); remove it or set data.bad_images: skip"
        ) from None


def read_dataset(folder, data):
    """(train Split, test Split or None, unreadable files skipped) of data.dataset, from the
    files `download` wrote into `folder` (a folder dataset: from data.path)."""
    if data.dataset == "cifar10":
        (archive,) = DATASETS["cifar10"].files
        return (*read_cifar10(Path(folder) / archive), [])
    if data.dataset == "mnist":
        return (*read_mnist(Path(folder)), [])
    return read_folder(data.path, data.image_size, data.bad_images)
