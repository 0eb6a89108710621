"""The datasets params.yaml can name: each one's official files and md5s (readers: readers.py)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    base_url: str | None  # official location of `files`; None: nothing to download
    files: dict  # file name -> official md5


DATASETS = {
    "cifar10": Dataset(
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    ),
    # torchvision's mirror: the original host often refuses scripted downloads.
    "mnist": Dataset(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    # The user's own images, read where they lie (data.path); nothing to download.
    "folder": Dataset(None, {}),
}
BAD_IMAGES = ("fail", "skip")  # data.bad_images: stop at an unreadable image, or leave it out
