"""The CIFAR reader on generated and real archives, its safety, and the stratified split."""

import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import CLASSES, pickled, write_cifar_archive

from transfer_study.core import paths
from transfer_study.core.atomic import write_json
from transfer_study.core.stage import UserError, exit_on_user_error
from transfer_study.data.readers import read_cifar10
from transfer_study.data.splits import (
    load_split,
    make_splits,
    read_array_file,
    save_split,
    split_counts,
    stratified_sample,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def test_reader_returns_images_labels_and_classes(archive):
    train, test = read_cifar10(archive)
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == np.uint8
    assert test.images.shape == (50, 3, 32, 32)
    assert train.classes == CLASSES
    assert np.bincount(train.labels).tolist() == [20] * 10


def test_reader_keeps_pixel_order(tmp_path):
    # The official rows are 1024 red, then 1024 green, then 1024 blue values.
    path = write_cifar_archive(tmp_path / "a.tar.gz", train_per_class=1, test_per_class=1)
    with tarfile.open(path) as tar:
        raw = pickle.loads(tar.extractfile("cifar-10-batches-py/test_batch").read())
    _, test = read_cifar10(path)
    np.testing.assert_array_equal(test.images[0, 1].ravel(), raw[b"data"][0, 1024:2048])


@pytest.mark.skipif(not (SHARED / "cifar-10-sample-python.tar.gz").exists(), reason="no sample")
def test_reader_loads_the_real_sample_archive():
    train, test = read_cifar10(SHARED / "cifar-10-sample-python.tar.gz")
    expected = json.loads((SHARED / "SOURCES.json").read_text())["cifar-10-sample-python.tar.gz"]
    assert (len(train.labels), len(test.labels)) == (expected["train"], expected["test"])
    assert train.classes[0] == "airplane" and set(np.unique(test.labels)) == set(range(10))


def test_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    payload = pickle.dumps({b"data": Exploit()}, protocol=2)
    path = write_cifar_archive(
        tmp_path / "evil.tar.gz", skip=("test_batch",), raw={"test_batch": payload}
    )
    with pytest.raises(UserError, match=r"refusing to load (__builtin__|builtins)\.print"):
        read_cifar10(path)


def test_reader_names_missing_members(tmp_path):
    path = write_cifar_archive(tmp_path / "a.tar.gz", skip=("data_batch_3",))
    with pytest.raises(UserError, match="lacks CIFAR-10 members: cifar-10-batches-py/data_batch_3"):
        read_cifar10(path)


def test_reader_refuses_a_non_archive_or_a_cut_one_in_one_line(tmp_path):
    path = tmp_path / "a.tar.gz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError) as refused:
        read_cifar10(path)
    assert str(refused.value) == f"{path} is not a tar archive (plain, gzip, bz2 or xz)"
    whole = write_cifar_archive(tmp_path / "whole.tar.gz").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="not a readable tar archive") as refused:
        read_cifar10(path)
    assert "\n" not in str(refused.value)


def test_stratified_sample_keeps_class_shares():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    chosen = stratified_sample(labels, 10, np.random.default_rng(0))
    assert np.bincount(labels[chosen]).tolist() == [4, 3, 2, 1]
    assert len(np.unique(chosen)) == 10


def test_split_is_seeded_stratified_and_disjoint(archive):
    train, test = read_cifar10(archive)
    splits = make_splits(train, test, val_fraction=0.2, seed=7)
    again = make_splits(train, test, val_fraction=0.2, seed=7)
    other = make_splits(train, test, val_fraction=0.2, seed=8)
    counts = split_counts(splits)
    assert counts["train"]["total"] == 160 and counts["val"]["total"] == 40
    assert all(counts["val"][c] == 4 for c in CLASSES)
    np.testing.assert_array_equal(splits["val"].images, again["val"].images)
    assert not np.array_equal(splits["val"].images, other["val"].images)
    # Disjoint: no train image appears in val (the fake images are all distinct).
    train_rows = {img.tobytes() for img in splits["train"].images}
    assert not any(img.tobytes() in train_rows for img in splits["val"].images)


def test_split_caps_are_stratified(archive):
    train, test = read_cifar10(archive)
    splits = make_splits(train, test, 0.2, seed=0, train_size=100, test_size=20)
    counts = split_counts(splits)
    assert (counts["train"]["total"], counts["val"]["total"], counts["test"]["total"]) == (
        80,
        20,
        20,
    )
    assert all(counts["test"][c] == 2 for c in CLASSES)


def test_split_file_round_trip(archive, tmp_path):
    train, _ = read_cifar10(archive)
    save_split(train, tmp_path / "train.npz")
    loaded = load_split(tmp_path / "train.npz")
    np.testing.assert_array_equal(loaded.images, train.images)
    np.testing.assert_array_equal(loaded.labels, train.labels)
    assert loaded.classes == CLASSES


def test_reader_refuses_labels_out_of_range(tmp_path):
    batch = {b"labels": [3, 10], b"data": np.zeros((2, 3072), dtype=np.uint8)}
    path = write_cifar_archive(
        tmp_path / "a.tar.gz", skip=("test_batch",), raw={"test_batch": pickled(batch)}
    )
    with pytest.raises(UserError, match="labels outside 0..9"):
        read_cifar10(path)


PIXELS = np.zeros((2, 3072), np.uint8)


@pytest.mark.parametrize(
    ("member", "payload", "message"),
    [
        ("data_batch_1", [1, 2], "data_batch_1 is a list, not a dict of data and labels"),
        ("data_batch_1", {b"labels": [0, 1]}, "data_batch_1: data is not a 2-d uint8 array"),
        ("batches.meta", {b"num_cases": 10}, "batches.meta has no list of label_names"),
        ("data_batch_1", {b"data": PIXELS[:, :100], b"labels": [0, 1]}, "rows hold 100 values"),
        ("test_batch", {b"data": PIXELS[:0], b"labels": []}, "test_batch hold no images"),
        ("data_batch_1", {b"data": PIXELS + 1e10, b"labels": [0, 1]}, "not a 2-d uint8 array"),
        ("data_batch_1", {b"data": PIXELS, b"labels": [0]}, "expected 2 labels, one per image"),
        ("data_batch_1", {b"data": PIXELS, b"labels": ["a", "b"]}, "labels are not integers"),
    ],
)
def test_malformed_batches_get_one_line(tmp_path, member, payload, message):
    path = write_cifar_archive(
        tmp_path / "a.tar.gz", skip=(member,), raw={member: pickled(payload, protocol=4)}
    )
    with pytest.raises(UserError, match=re.escape(message)):
        read_cifar10(path)


def test_members_count_only_at_their_official_path_and_once(tmp_path):
    moved = write_cifar_archive(tmp_path / "a.tar.gz", skip=("test_batch",))
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        with tarfile.open(moved) as source:
            for member in source:
                tar.addfile(member, source.extractfile(member))
        info = tarfile.TarInfo("elsewhere/test_batch")  # same file name, another folder
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    with pytest.raises(UserError, match="lacks CIFAR-10 members: cifar-10-batches-py/test_batch"):
        read_cifar10(tmp_path / "b.tar")
    twice = write_cifar_archive(tmp_path / "c.tar.gz", raw={"test_batch": b"later copy"})
    with pytest.raises(UserError, match="member cifar-10-batches-py/test_batch appears twice"):
        read_cifar10(twice)


def test_a_member_far_larger_than_a_batch_is_refused_unread(tmp_path, monkeypatch):
    # The real bound is 64 MiB.
    monkeypatch.setattr("transfer_study.data.readers.MAX_MEMBER_BYTES", 1000)
    with pytest.raises(UserError, match=r"data_batch_1 holds [\d,]+ bytes; a CIFAR batch"):
        read_cifar10(write_cifar_archive(tmp_path / "a.tar.gz"))


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"val_fraction": 0.01}, "the val split has no image of class"),
        ({"val_fraction": 0.99}, "the train split has no image of class"),
        ({"test_size": 5}, "the test split has no image of class"),
    ],
)
def test_splits_too_small_for_every_class_name_the_knob(archive, sizes, message):
    train, test = read_cifar10(archive)
    options = {"val_fraction": 0.2, "seed": 0, **sizes}
    with pytest.raises(UserError, match=message):
        make_splits(train, test, **options)


def _damaged_splits(path, good):
    """What a split file a later stage opens may be instead: each (name, bytes or None)."""
    wrong = io.BytesIO()
    np.savez(wrong, images=np.zeros((2, 3, 4, 4), np.float32), labels=np.zeros(2), classes=["a"])
    labels_out_of_range = io.BytesIO()
    np.savez(
        labels_out_of_range,
        images=np.zeros((2, 3, 4, 4), np.uint8),
        labels=np.array([0, 5]),
        classes=np.array(["a", "b"]),
    )
    return {
        "missing": None,
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "not numpy": b"<html>not found</html>",
        "a pickle": pickle.dumps({"images": 1}),
        "float images": wrong.getvalue(),
        "labels out of range": labels_out_of_range.getvalue(),
    }


def test_a_missing_or_damaged_split_is_one_line_naming_its_stage(tmp_path, archive):
    train, test = read_cifar10(archive)
    path = tmp_path / "data" / "split" / "train.npz"
    saved = make_splits(train, test, 0.2, seed=0)["train"]
    save_split(saved, path)
    good = path.read_bytes()
    for what, content in _damaged_splits(path, good).items():
        path.unlink(missing_ok=True)
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(UserError) as refused:
            load_split(path)
        message = str(refused.value)
        assert message.startswith(f"{path} ") and "\n" not in message, (what, message)
        assert "dvc repro split" in message and "allow_pickle" not in message, (what, message)
        assert len(message) < 200 + 2 * len(str(path)), (what, message)
    path.write_bytes(good)
    assert np.array_equal(load_split(path).labels, saved.labels)


def test_missing_or_damaged_features_name_their_featurize_stage(tmp_path):
    path = tmp_path / "train.npy"
    with pytest.raises(UserError, match=r"train.npy does not exist: run the featurize_lite0 stage"):
        read_array_file(path, "featurize_lite0")
    path.write_bytes(b"\x93NUMPY cut short")
    with pytest.raises(UserError, match=r"train.npy is damaged \(.*\); rerun featurize_lite0"):
        read_array_file(path, "featurize_lite0")


def _cache_damages(rows):
    """{what: (damage done to a good lite0 cache of the train split, the line it gets)}."""
    train, meta = paths.features_file("lite0", "train"), paths.features_meta("lite0")
    rerun = "rerun featurize_lite0 (dvc repro featurize_lite0)"
    wrong = f"not float16 of shape ({rows}, 8) (the split's images, meta.json's feature_dim); "
    bad_meta = (
        f"{meta} does not hold the description featurize_lite0 writes (a mapping with "
        f"feature_dim, shape and backbone_params); {rerun}"
    )
    return {
        "float32": (
            lambda: np.save(train, np.zeros((rows, 8), np.float32)),
            f"{train} holds float32 values of shape ({rows}, 8), {wrong}{rerun}",
        ),
        "width": (
            lambda: np.save(train, np.zeros((rows, 9), np.float16)),
            f"{train} holds float16 values of shape ({rows}, 9), {wrong}{rerun}",
        ),
        "rows": (
            lambda: np.save(train, np.zeros((rows - 1, 8), np.float16)),
            f"{train} holds float16 values of shape ({rows - 1}, 8), {wrong}{rerun}",
        ),
        "rank": (
            lambda: np.save(train, np.zeros((rows, 8, 1), np.float16)),
            f"{train} holds float16 values of shape ({rows}, 8, 1), {wrong}{rerun}",
        ),
        "nan": (
            lambda: np.save(train, np.full((rows, 8), np.nan, np.float16)),
            f"{train} holds NaN or infinite values; {rerun}",
        ),
        "one inf": (
            lambda: np.save(train, np.where(np.eye(rows, 8) > 0, np.inf, 1).astype(np.float16)),
            f"{train} holds NaN or infinite values; {rerun}",
        ),
        "meta missing": (
            meta.unlink,
            f"{meta} does not exist: run the featurize_lite0 stage first (dvc repro "
            "featurize_lite0)",
        ),
        "meta damaged": (lambda: meta.write_bytes(b'{"feature_dim": 8,'), bad_meta),
        "meta not UTF-8": (lambda: meta.write_bytes(b"\xff\xfe{}"), bad_meta),
        "meta a list": (lambda: meta.write_text("[8]"), bad_meta),
        "meta inconsistent": (
            lambda: meta.write_text(json.dumps({"feature_dim": 9, "shape": [8]})),
            bad_meta,
        ),
        "a left-out model's marker": (lambda: meta.write_text('{"skipped": true}'), bad_meta),
    }


@pytest.mark.parametrize("what", list(_cache_damages(1)))
def test_a_cache_that_does_not_fit_its_split_names_the_file_and_stage(workdir, what, capsys):
    from transfer_study.nn.build import load_inputs

    rows = len(load_split(paths.split_file("train")).labels)
    # What featurize_lite0 writes for a cut: float16 rows, one an image, as wide as meta says.
    meta = {"inputs": "activations", "feature_dim": 8, "shape": [2, 2, 2], "backbone_params": 9}
    write_json(paths.features_meta("lite0"), meta)
    np.save(paths.features_file("lite0", "train"), np.ones((rows, 8), np.float16))
    assert load_inputs("lite0", "activations", "train")[0].shape == (rows, 8)
    damage, message = _cache_damages(rows)[what]
    damage()
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(load_inputs)("lite0", "activations", "train")
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
