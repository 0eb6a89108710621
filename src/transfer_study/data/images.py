"""Image files: which files in a folder are images, and one image read as training images are
stored (upright, RGB or grayscale, resized)."""

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def images_below(folder):
    """(image files below `folder`, recursively and sorted; folders met that are symbolic links):
    the one listing rule of folder datasets and predict. Hidden entries (names starting with a
    dot: .ipynb_checkpoints, macOS ._ files) are left out and linked folders are not entered;
    linked files are read, as DVC hashes them too."""
    files, linked_folders = [], []

    def fail(error):  # os.walk would skip an unreadable folder silently
        raise error

    for top, folders, names in os.walk(folder, onerror=fail):
        top = Path(top)
        linked_folders += [top / n for n in folders if not is_hidden(n) and (top / n).is_symlink()]
        folders[:] = [n for n in folders if not is_hidden(n) and not (top / n).is_symlink()]
        files += [top / n for n in names if not is_hidden(n) and _is_image_name(n)]
    return sorted(files), sorted(linked_folders)


def is_hidden(name):
    return name.startswith(".")


def _is_image_name(name):
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


# What PIL raises for a file it cannot decode.
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)


# The modes PIL opens a 16-bit grayscale PNG in: I;16 (and its byte orders), or I in older Pillow.
SIXTEEN_BIT_GRAYSCALE = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path, shape):
    """uint8 C x H x W pixels of an image file, upright by its EXIF orientation (as a phone
    photo is viewed), grayscale (C = 1) or RGB, resized to H x W."""
    channels, height, width = shape
    if not Path(path).is_file():  # a FIFO or a device would block the read, or never end it
        raise OSError("not a regular file")
    with _open_image(path) as image:
        upright = ImageOps.exif_transpose(image)
        if upright.mode in SIXTEEN_BIT_GRAYSCALE:
            # convert() clips their 0-65535 values at 255, so that a 16-bit photo comes out
            # white: keep each value's top 8 bits instead.
            top = np.asarray(upright).astype(np.int64) >> 8
            upright = Image.fromarray(np.clip(top, 0, 255).astype(np.uint8))
        converted = upright.convert("L" if channels == 1 else "RGB")
        pixels = np.asarray(converted.resize((width, height), Image.BILINEAR))
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _open_image(path):
    """Image.open, with PIL's decompression-bomb warning (over Image.MAX_IMAGE_PIXELS) turned
    into a refusal in the project's words rather than a raw Python warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ValueError(
                f"more than {Image.MAX_IMAGE_PIXELS:,} pixels, refused as a possible "
                "decompression bomb"
            ) from None
