"""`python -m transfer_study predict`: top-3 classes of image files with a trained model."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CLASSES, REPO, tiny_overrides
from PIL import Image

from transfer_study import layout
from transfer_study.data import load_split
from transfer_study.errors import UserError
from transfer_study.evaluation import predict_logits
from transfer_study.features import featurize_model
from transfer_study.markers import skip_training
from transfer_study.networks import load_trained
from transfer_study.params import deep_merge, load_params
from transfer_study.predict import predict_files
from transfer_study.training import train_model


def params(archive, **overrides):
    return load_params(f"{REPO}/params.yaml", deep_merge(tiny_overrides(archive), overrides))


def save_test_images(folder, count=3):
    """The first test images as PNG files (lossless), with their labels."""
    test = load_split(layout.split_file("test"))
    paths = []
    for i in range(count):
        paths.append(folder / f"test{i}.png")
        Image.fromarray(test.images[i].transpose(1, 2, 0)).save(paths[-1])
    return paths, test


def test_cli_prints_the_top_three_classes(workdir, archive):
    train_model("mlp", params(archive, train={"max_epochs": 4, "patience": 4}))
    paths, test = save_test_images(workdir)
    result = subprocess.run(
        [sys.executable, "-m", "transfer_study", "predict", "--model", "mlp", *map(str, paths)],
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": f"{REPO}/src"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * 4 and lines[0] == str(paths[0])
    ranked = [line.split() for line in lines[1:4]]
    assert all(name in CLASSES for name, _ in ranked)
    probabilities = [float(p) for _, p in ranked]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.001
    # The same answer as the network on the stored test pixels.
    net, _, _ = load_trained(layout.model_file("mlp"))
    expected = predict_logits(net, test.images[:1]).softmax(dim=1)[0]
    assert ranked[0][0] == CLASSES[int(expected.argmax())]
    assert probabilities[0] == pytest.approx(float(expected.max()), abs=1e-3)


def test_frozen_backbone_predicts_through_its_extractor(workdir, archive):
    p = params(archive)
    featurize_model("vgg16", p.model("vgg16"))
    train_model("vgg16", p)
    paths, test = save_test_images(workdir, count=2)
    results = predict_files("vgg16", paths, top=3)
    assert [path for path, _ in results] == [str(p) for p in paths]
    net, _, _ = load_trained(layout.model_file("vgg16"))
    features = torch.from_numpy(np.load(layout.features_file("vgg16", "test"))[:2])
    expected = predict_logits(net, features).softmax(dim=1)
    for (_, ranked), row in zip(results, expected):
        assert len(ranked) == 3 and ranked[0][0] == CLASSES[int(row.argmax())]


def test_predict_explains_what_is_missing(workdir, archive):
    with pytest.raises(UserError, match="models/mlp.pt does not exist: train it first"):
        predict_files("mlp", ["x.png"])
    skip_training("mlp")
    with pytest.raises(UserError, match="mlp was left out of `models`"):
        predict_files("mlp", ["x.png"])
    train_model("mlp", params(archive, train={"max_epochs": 1}))
    (workdir / "x.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image x.png"):
        predict_files("mlp", ["x.png"])
