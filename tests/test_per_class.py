"""train.per_class: labeled images drawn per class, nested and seeded; features serve every size."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl

from transfer_study.core import paths
from transfer_study.core.stage import UserError
from transfer_study.data.splits import draw_per_class
from transfer_study.train.fit import train_model
from transfer_study.train.inputs import MIN_EPOCH_IMAGES

CLASSES = ("cat", "dog", "frog")


def test_draws_are_stratified_seeded_and_nested():
    labels = np.repeat([0, 1, 2], [50, 40, 60])
    np.random.default_rng(0).shuffle(labels)
    draws = {n: draw_per_class(labels, CLASSES, n, seed=7, key="k") for n in (1, 5, 20, 40)}
    for n, drawn in draws.items():
        assert np.bincount(labels[drawn]).tolist() == [n, n, n]
        assert np.array_equal(drawn, np.sort(drawn)) and len(set(drawn)) == 3 * n
    for small, large in zip([1, 5, 20], [5, 20, 40]):
        assert set(draws[small]) <= set(draws[large])
    assert np.array_equal(draw_per_class(labels, CLASSES, 20, 7, "k"), draws[20])
    assert not np.array_equal(draw_per_class(labels, CLASSES, 20, 8, "k"), draws[20])


def test_more_than_a_class_holds_is_refused_naming_it():
    labels = np.repeat([0, 1, 2], [50, 40, 60])
    with pytest.raises(UserError) as error:
        draw_per_class(labels, CLASSES, 41, seed=0, key="mlp.train.per_class")
    assert str(error.value) == (
        "mlp.train.per_class = 41: class 'dog' has 40 train images; use at most 40, or null "
        "for every image"
    )


class CountBatches(pl.Callback):
    def __init__(self):
        self.first_epoch = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.first_epoch += trainer.current_epoch == 0


def test_training_on_a_draw_records_it_and_keeps_epochs_long(study):
    p = study.params_with(train={"per_class": 3, "batch_size": 64, "max_epochs": 1})
    batches = CountBatches()
    metrics = train_model("vgg16", p, callbacks=[batches])  # a head on cached features
    # 3 images of each of the 10 classes; batches no larger than that; an epoch passes over the
    # draw 137 times (4,110 images, at least MIN_EPOCH_IMAGES), in batches of 30.
    assert (metrics["train_images"], metrics["per_class"], metrics["batch_size"]) == (30, 3, 30)
    assert batches.first_epoch == -(-MIN_EPOCH_IMAGES // 30) == 137
    assert json.loads(paths.train_metrics("vgg16").read_text())["train_images"] == 30
    every_image = train_model("vgg16", study.params_with(train={"max_epochs": 1}))
    assert every_image["train_images"] == 120 and every_image["per_class"] is None
