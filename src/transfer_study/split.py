"""The split stage's input: the dataset data.dataset names, read by its reader (data/readers.py)."""

from pathlib import Path

from transfer_study.data.catalog import DATASETS
from transfer_study.data.readers import read_cifar10, read_folder, read_mnist


def read_dataset(folder, data):
    """(train Split, test Split or None, unreadable files skipped) of data.dataset, from the
    files `download` wrote into `folder` (a folder dataset: from data.path)."""
    if data.dataset == "cifar10":
        (archive,) = DATASETS["cifar10"].files
        return (*read_cifar10(Path(folder) / archive), [])
    if data.dataset == "mnist":
        return (*read_mnist(Path(folder)), [])
    return read_folder(data.path, data.image_size, data.bad_images)
