"""The head first: a fine-tuned backbone's new head trains alone on the frozen backbone's
features, and fine-tuning starts from that head's weights."""

import pytest
import pytorch_lightning as pl
import torch
from helpers import only, params

from transfer_study.featurize import featurize_model
from transfer_study.train.fit import train_model
from transfer_study.train.head_first import train_head_first
from transfer_study.train.inputs import load_training_inputs
from transfer_study.train.network import build_classifier

# Lite0 fine-tuned whole from images, or its top 2 blocks from the activations featurize caches.
CASES = {"images": "all", "activations": 2}


class StartingHead(pl.Callback):
    """The head's weights as fine-tuning starts."""

    def on_train_start(self, trainer, module):
        self.state = _copy(module.net[-1])


def _copy(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _settings(archive, inputs, head_epochs):
    section = {"trainable_layers": CASES[inputs], "head_epochs": head_epochs}
    settings = params(archive, models=only("lite0"), train={"max_epochs": 1}, lite0=section)
    if inputs == "activations":
        featurize_model("lite0", settings.model("lite0"), hflip=False)
    return settings


def _built(settings, name):
    """The network as train_model builds it, from the same seed."""
    pl.seed_everything(settings.seed, workers=True)
    section = settings.model(name)
    inputs = load_training_inputs(name, section, settings.seed, settings.train.crop)
    return build_classifier(name, section, inputs).net, inputs


@pytest.mark.parametrize("inputs", list(CASES))
def test_fine_tuning_starts_from_the_head_trained_first(workdir, archive, inputs):
    name = "lite0"
    settings = _settings(archive, inputs, head_epochs=2)
    start = StartingHead()
    metrics = train_model(name, settings, callbacks=[start])
    assert metrics["head_first_seconds"] > 0

    net, inputs = _built(settings, name)
    random_head, below = _copy(net[-1]), _copy(net[:-1])
    section = settings.model(name)
    train_head_first(name, net, inputs, section.train, 2, section.head_lr, settings.seed)
    assert _same(start.state, _copy(net[-1]))  # the start of fine-tuning, value by value
    assert not _same(random_head, _copy(net[-1]))  # the head did train
    # Nothing below the head moved, batch norms' running statistics included (eval mode).
    assert _same(below, _copy(net[:-1]))


def test_without_head_epochs_fine_tuning_starts_from_the_random_head(workdir, archive):
    settings = _settings(archive, "activations", head_epochs=0)
    start = StartingHead()
    metrics = train_model("lite0", settings, callbacks=[start])
    assert metrics["head_first_seconds"] == 0
    net, _ = _built(settings, "lite0")
    assert _same(start.state, _copy(net[-1]))


def test_a_frozen_backbone_has_no_head_first(workdir, archive):
    settings = params(archive, models=only("lite0"), lite0={"head_epochs": 3})
    featurize_model("lite0", settings.model("lite0"), hflip=False)
    assert train_model("lite0", settings)["head_first_seconds"] == 0
