"""MNIST's idx files, folders of images, downloads of several files, and crafted archives."""

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, background_fixtures, only, write_cifar_archive, write_params
from PIL import Image

from transfer_study.core.catalog import DATASETS
from transfer_study.core.config import DataParams
from transfer_study.core.stage import UserError
from transfer_study.data.readers import read_cifar10, read_folder, read_mnist
from transfer_study.data.splits import make_splits
from transfer_study.download import download_dataset, fetch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def write_idx(path, array):
    """An idx file as MNIST ships it: gzipped, big-endian sizes, uint8 data."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_mnist(folder, train=60, test=20, seed=0):
    """The four MNIST files, with digits whose brightness depends on the label."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % 10
        images = np.clip(labels[:, None, None] * 25 + rng.normal(0, 5, (n, 28, 28)), 0, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def data_params(**fields):
    defaults = {
        "dataset": "cifar10",
        "url": "official",
        "md5": "official",
        "path": "data/images",
        "image_size": None,
        "bad_images": "fail",
        "val_fraction": 0.2,
        "train_size": None,
        "test_size": None,
    }
    return DataParams(**{**defaults, **fields})


def test_mnist_reader_gives_grayscale_images(tmp_path):
    train, test = read_mnist(write_mnist(tmp_path))
    assert train.images.shape == (60, 1, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (20, 1, 28, 28) and train.classes[3] == "3"
    assert train.labels.tolist() == [i % 10 for i in range(60)]


def test_mnist_truncated_file_is_named(tmp_path):
    folder = write_mnist(tmp_path)
    data = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz holds 15580 values"):
        read_mnist(folder)


def test_mnist_download_from_a_mirror_folder(tmp_path):
    mirror = write_mnist(tmp_path / "mirror")
    record = download_dataset(
        data_params(dataset="mnist", url=str(mirror), md5=None), tmp_path / "raw"
    )
    assert sorted(record["files"]) == sorted(DATASETS["mnist"].files)
    assert json.loads((tmp_path / "raw" / "source.json").read_text()) == record
    train, _ = read_mnist(tmp_path / "raw")
    assert len(train.labels) == 60


def test_mnist_download_checks_the_official_md5s(tmp_path):
    mirror = write_mnist(tmp_path / "mirror")
    with pytest.raises(UserError, match="expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download_dataset(data_params(dataset="mnist", url=str(mirror)), tmp_path / "raw")


def test_official_sources_are_the_published_files():
    assert DATASETS["cifar10"].base_url + "cifar-10-python.tar.gz" == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )
    assert DATASETS["mnist"].files["t10k-labels-idx1-ubyte.gz"] == (
        "ec29112dd5afa0611ce80d1b7f02629c"
    )


def write_folder(root, classes=("cat", "dog", "frog"), per_class=6, suffix=".png"):
    """Class folders of images of assorted sizes, coloured by class."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (20 + 7 * i, 15 + 5 * i)
            Image.new("RGB", size, (80 * label, 40, 200 - 60 * label)).save(
                root / name / f"{i}{suffix}"
            )
    return root


def test_folder_images_are_decoded_once_and_resized(tmp_path):
    train, test, skipped = read_folder(write_folder(tmp_path / "imgs"), 16)
    assert train.images.shape == (18, 3, 16, 16) and test is None and skipped == []
    assert train.classes == ("cat", "dog", "frog")
    assert train.images[train.labels == 1][:, 0].mean() == pytest.approx(80, abs=1)
    splits = make_splits(train, test, 0.2, seed=0)  # no test/ folder: test drawn first
    sizes = [len(splits[s].labels) for s in ("train", "val", "test")]
    assert sizes == [11, 3, 4] and sum(sizes) == 18


def test_folder_with_train_and_test_subfolders(tmp_path):
    write_folder(tmp_path / "imgs" / "train", suffix=".jpg")
    write_folder(tmp_path / "imgs" / "test", classes=("cat", "frog"), per_class=2)
    train, test, _ = read_folder(tmp_path / "imgs", 12)
    assert len(train.labels) == 18 and test.classes == train.classes
    assert sorted(set(test.labels.tolist())) == [0, 2]  # test keeps train's class indices


def test_folder_reader_recurses_and_leaves_hidden_entries_out(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "dog" / "2024" / "may").mkdir(parents=True)
    (root / "dog" / "0.png").rename(root / "dog" / "2024" / "may" / "0.png")  # still a dog
    (root / ".ipynb_checkpoints" / "x").mkdir(parents=True)  # not a class
    (root / ".ipynb_checkpoints" / "x" / "0.png").write_bytes((root / "cat" / "0.png").read_bytes())
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    (root / "cat" / ".ipynb_checkpoints" / "1-checkpoint.png").write_bytes(b"a stale copy")
    (root / "cat" / "._0.png").write_bytes(b"\0\5\26\7 macOS resource fork, not a PNG")
    (root / "cat" / ".DS_Store").write_bytes(b"Bud1")
    (tmp_path / "elsewhere.png").write_bytes((root / "frog" / "0.png").read_bytes())
    (root / "frog" / "linked.png").symlink_to(tmp_path / "elsewhere.png")  # DVC hashes it
    train, _, skipped = read_folder(root, 16)
    assert train.classes == ("cat", "dog", "frog") and skipped == []
    assert np.bincount(train.labels).tolist() == [6, 6, 7]


@pytest.mark.parametrize("where", ["class", "below a class", "train"])
def test_a_linked_folder_dvc_would_not_hash_is_refused(tmp_path, where):
    root = tmp_path / "imgs"
    outside = write_folder(tmp_path / "outside")
    if where == "train":
        (root).mkdir()
        (root / "train").symlink_to(outside)
        linked = root / "train"
    else:
        write_folder(root, classes=("cat", "dog"))
        linked = root / "frog" if where == "class" else root / "cat" / "more"
        linked.symlink_to(outside / "frog")
    with pytest.raises(UserError) as refused:
        read_folder(root, 16)
    assert str(refused.value) == (
        f"{linked} is a link to a folder, which DVC does not look into (a change there would "
        "not rerun split); copy the folder into data.path instead (links to image files are fine)"
    )


def test_images_are_turned_upright_by_their_exif_orientation(tmp_path):
    upright = np.zeros((20, 30, 3), np.uint8)  # 30 wide, 20 high: left half red, right blue
    upright[:, :15, 0], upright[:, 15:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels are to be turned 90 degrees clockwise
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 20 wide, 30 high
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    stored.save(tmp_path / "imgs" / "a" / "phone.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "imgs" / "a" / "plain.png")
    write_folder(tmp_path / "imgs", classes=("b",))
    train, _, _ = read_folder(tmp_path / "imgs", 16)
    phone, plain = train.images[:2]  # sorted: phone.png, plain.png
    assert np.array_equal(phone, plain)
    assert phone[0, :, :8].min() > 200 and phone[2, :, 8:].min() > 200  # red left, blue right


def test_a_16_bit_png_is_read_as_its_top_8_bits(tmp_path):
    # PIL's convert clipped 16-bit values at 255: 17 of 816 sample train images came out white.
    wide = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)  # 0 to 59,900
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(wide).save(tmp_path / "imgs" / "a" / "deep.png")  # mode I;16
    Image.fromarray((wide >> 8).astype(np.uint8)).save(tmp_path / "imgs" / "a" / "plain.png")
    write_folder(tmp_path / "imgs", classes=("b",))
    train, _, _ = read_folder(tmp_path / "imgs", 16)
    deep, plain = train.images[:2]  # sorted: deep.png, plain.png
    assert np.array_equal(deep, plain) and deep.mean() < 128


@pytest.mark.parametrize("pixels", [1_500, 2_500])  # over PIL's warning limit; over its error
def test_a_decompression_bomb_is_one_line_and_no_warning(tmp_path, monkeypatch, recwarn, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # PIL warns above it, fails above 2x
    root = write_folder(tmp_path / "imgs", per_class=2)
    Image.new("RGB", (pixels // 10, 10)).save(root / "cat" / "big.png")
    with pytest.raises(UserError) as refused:
        read_folder(root, 16)
    assert str(refused.value) == (
        f"cannot read image {root / 'cat' / 'big.png'} (more than 1,000 pixels, refused as a "
        "possible decompression bomb); remove it or set data.bad_images: skip"
    )
    train, _, skipped = read_folder(root, 16, bad_images="skip")
    assert skipped == [str(root / "cat" / "big.png")] and len(train.labels) == 6
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_folder_class_without_images_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "empty").mkdir()
    with pytest.raises(UserError, match=f"class folder {root / 'empty'} holds no images"):
        read_folder(root, 16)


@pytest.mark.parametrize("bad_images", ["fail", "skip"])
def test_corrupt_image_fails_or_is_skipped_by_param(tmp_path, bad_images):
    root = write_folder(tmp_path / "imgs")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    if bad_images == "fail":
        with pytest.raises(UserError, match="broken.jpg .*set data.bad_images: skip"):
            read_folder(root, 16, bad_images)
        return
    train, _, skipped = read_folder(root, 16, bad_images)
    assert len(train.labels) == 18 and skipped == [str(root / "dog" / "broken.jpg")]


def test_single_class_dataset_is_refused(tmp_path):
    train, test, _ = read_folder(write_folder(tmp_path / "imgs", classes=("cat",)), 16)
    with pytest.raises(UserError, match=r"single class \(cat\): a classifier needs"):
        make_splits(train, test, 0.2, seed=0)


@pytest.mark.skipif(not (SHARED / "cifar10-folder-sample").exists(), reason="no sample")
def test_folder_reader_on_the_cifar_sample_folder():
    train, test, skipped = read_folder(SHARED / "cifar10-folder-sample", 32)
    assert (len(train.labels), len(test.labels), skipped) == (1000, 200, [])
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    assert np.bincount(test.labels).tolist() == [20] * 10


def crafted_archive(path, name, kind=tarfile.REGTYPE):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return path


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../../data_batch_1", tarfile.REGTYPE, "points outside the archive"),
        ("{tmp}/data_batch_1", tarfile.REGTYPE, "points outside the archive"),  # absolute
        ("cifar-10-batches-py/data_batch_1", tarfile.SYMTYPE, "is a link"),
    ],
)
def test_crafted_archive_members_are_refused(tmp_path, monkeypatch, name, kind, message):
    # Everywhere an extracting reader could write lies in tmp_path: the working folder, the
    # archive's folder and two folders up from either, the temporary folder, an absolute path.
    work, scratch = tmp_path / "a" / "b", tmp_path / "tmp"
    work.mkdir(parents=True)
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = crafted_archive(work / "evil.tar.gz", name.format(tmp=scratch), kind)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message):
        read_cifar10(path)
    assert sorted(tmp_path.rglob("*")) == before  # nothing was written anywhere


def test_official_layout_archive_still_reads(tmp_path):
    train, _ = read_cifar10(write_cifar_archive(tmp_path / "a.tar.gz"))
    assert len(train.labels) == 200


def mnist_study(runs):
    """download → split → train/featurize → evaluate → report on generated MNIST files, each
    stage by its script: each stage's exit status and stderr's end, and what the tests read."""
    folder = runs.folder("mnist_study")
    mirror = write_mnist(folder / "mirror", train=200, test=50)
    overrides = {
        "models": only("mlp", "lite0"),
        "data": {"dataset": "mnist", "url": str(mirror), "md5": None},
        "train": {"batch_size": 32, "max_epochs": 2, "patience": 1},
        "mlp": {"image_size": 28, "hidden": [128], "activation": "sigmoid"},
        "lite0": {"weights": "none", "image_size": 32},
    }
    project = folder / "project"
    project.mkdir()
    write_params(project / "params.yaml", overrides)
    env = {**os.environ, "PYTHONPATH": f"{REPO}/src"}
    stages = (
        "download",
        "split",
        "train mlp",
        "featurize lite0",
        "train lite0",
        "evaluate",
        "report",
    )
    probed = ("featurize lite0", "evaluate")  # which modules they import, for the test
    ran, imported = {}, {}
    for stage in stages:
        script, *args = stage.split()
        result = subprocess.run(
            [sys.executable, f"{REPO}/stages/{script}.py", *args],
            cwd=project,
            env={**env, "PYTHONPROFILEIMPORTTIME": "1"} if stage in probed else env,
            capture_output=True,
            text=True,
        )
        ran[stage] = (result.returncode, result.stderr[-2000:])
        timed = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
        imported[stage] = sorted({line.rsplit("|", 1)[-1].strip() for line in timed})
        if result.returncode != 0:
            return {"stages": ran}
    saved = torch.load(project / "models" / "mlp.pt", weights_only=True)
    return {
        "stages": ran,
        "evaluated": json.loads((project / "metrics" / "evaluate.json").read_text()),
        "shape": saved["config"]["data"]["shape"],
        "first weights": list(saved["state_dict"]["2.0.weight"].shape),
        "split": json.loads((project / "metrics" / "split.json").read_text()),
        "misclassified": (project / "reports" / "figures" / "misclassified_mlp.png").exists(),
        "imported": imported,
    }


RUNS = [mnist_study]  # background runs (conftest)
globals().update(background_fixtures(RUNS))


def test_mnist_study_end_to_end_through_the_stages(mnist_study):
    """The MNIST study through the stages: the MLP sees 1 x 28 x 28 inputs, Lite0 the
    grayscale replicated to RGB."""
    for stage, (code, stderr) in mnist_study["stages"].items():
        assert code == 0, f"{stage}: {stderr}"
    assert len(mnist_study["stages"]) == 7
    assert set(mnist_study["evaluated"]) == {"mlp", "lite0"}
    assert mnist_study["shape"] == [1, 28, 28]
    assert mnist_study["first weights"] == [128, 28 * 28]
    assert mnist_study["split"]["test"]["total"] == 50
    assert mnist_study["misclassified"]
    # Its import costs about 2 CPU seconds (torch._dynamo comes with it): stages that only run
    # an MLP or heads on cached features (Lite0's) never import it.
    for stage in ("featurize lite0", "evaluate"):
        assert "torch" in mnist_study["imported"][stage]
        assert "torchvision" not in mnist_study["imported"][stage], stage


def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    write_folder(tmp_path / "imgs")
    os.mkfifo(tmp_path / "imgs" / "cat" / "pipe.jpg")  # opening it to read would block
    with pytest.raises(UserError, match=r"cannot read image .*pipe.jpg \(not a regular file\)"):
        read_folder(tmp_path / "imgs", 16)
    train, _, skipped = read_folder(tmp_path / "imgs", 16, bad_images="skip")
    assert skipped == [str(tmp_path / "imgs" / "cat" / "pipe.jpg")] and len(train.labels) == 18
    with pytest.raises(UserError, match=r"data.url = .*pipe.jpg: not a regular file"):
        fetch(str(tmp_path / "imgs" / "cat" / "pipe.jpg"), tmp_path / "out")
