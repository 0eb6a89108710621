"""docs/results.md "Full CIFAR-10": each command parses, and each of its params reaches the
network, the optimizer, the schedule, the trainer or evaluate."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, STATS, documented_commands, grid, linear_widths
from torch import nn

from transfer_study.core.config import load_params, uses_features
from transfer_study.core.params_file import deep_merge
from transfer_study.nn.backbones import cached_inputs
from transfer_study.nn.build import build_net
from transfer_study.nn.layers import Residual
from transfer_study.train.head_first import trains_head_first
from transfer_study.train.module import Classifier
from transfer_study.train.optim import lr_factor, param_groups
from transfer_study.train.trainer import resolve_precision

FULL = (
    "-S data.dataset=folder -S data.path=../cifar10-train -S data.image_size=32 "
    "-S data.val_fraction=0.1"
)


SECTION = "Full CIFAR-10"
# The commands of that section, by their labels there: the tests below check each one's params.
NAMES = (
    "mlp",
    "mlp_long",
    "mlp_mixup",
    "frozen",
    "lite2",
    "partial_top3",
    "partial_top5",
    "partial_top6",
    "partial_top6_head",
    "fine_tuned",
)


def overrides(name):
    """The params overrides of the section's command `name`, $FULL's flags included."""
    (found,) = grid(documented_commands(SECTION)[name].replace("$FULL", FULL))
    return found


def params(name):
    return load_params(f"{REPO}/params.yaml", overrides(name))


def random_weights_params(name, model="lite0"):
    """params(name), `model` with random weights: the network is built, nothing downloaded."""
    return load_params(
        f"{REPO}/params.yaml", deep_merge(overrides(name), {model: {"weights": "none"}})
    )


def test_results_doc_gives_the_data_flags_and_one_command_for_each_name():
    results = Path(REPO, "docs", "results.md").read_text()
    assert f'FULL="{FULL}"' in results.split(f"## {SECTION}")[1]
    assert list(documented_commands(SECTION)) == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_command_sets_the_data_flags(name):
    data = params(name).data
    assert (data.dataset, data.path, data.image_size, data.val_fraction) == (
        "folder",
        "../cifar10-train",
        32,
        0.1,
    )


def test_strong_mlp_reaches_network_optimizer_schedule_and_trainer():
    p = params("mlp")
    assert p.models == ("mlp",) and p.evaluate.hflip
    mlp = p.model("mlp")
    net = build_net("mlp", mlp, 10, STATS)
    assert linear_widths(net) == [(3072, 1024), (1024, 1024), (1024, 1024), (1024, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.modules()) == 3
    assert sum(isinstance(m, Residual) for m in net.modules()) == 2  # 1024 -> 1024 twice
    assert any(isinstance(m, nn.GELU) for m in net.modules())
    module = Classifier(net, mlp.train, 10, pixels=True)
    module._trainer = SimpleNamespace(estimated_stepping_batches=40 * 159, max_epochs=40)
    built = module.configure_optimizers()
    assert isinstance(built["optimizer"], torch.optim.AdamW)
    assert built["optimizer"].defaults["weight_decay"] == 0.05
    train = mlp.train
    assert lr_factor(train, 0, 159) == pytest.approx(1 / 318)  # warming up over 2 epochs
    assert lr_factor(train, 318, 159) == pytest.approx(1.0)
    assert lr_factor(train, 40 * 159 - 1, 159) < 1e-3
    assert (train.label_smoothing, train.crop, train.hflip, train.batch_size) == (0.1, 2, True, 256)
    assert (train.patience, train.max_epochs) == (40, 40)
    assert resolve_precision(train) == "bf16-mixed"


def test_frozen_lite0_trains_a_wide_head_on_plain_and_mirrored_features():
    p = params("frozen")
    lite0 = p.model("lite0")
    assert p.models == ("lite0",) and uses_features(lite0)
    assert p.train.hflip and p.evaluate.hflip  # featurize caches both mirrored splits
    head = build_net("lite0", lite0, 10, STATS, feature_dim=1280)
    assert linear_widths(head) == [(1280, 2048), (2048, 10)]
    assert [m.p for m in head.modules() if isinstance(m, nn.Dropout)] == [0.6]
    assert any(isinstance(m, nn.GELU) for m in head.modules())
    train = lite0.train
    module = Classifier(head, train, 10)
    module._trainer = SimpleNamespace(estimated_stepping_batches=30 * 159, max_epochs=30)
    built = module.configure_optimizers()
    assert isinstance(built["optimizer"], torch.optim.AdamW)
    assert built["optimizer"].defaults["weight_decay"] == 0.1
    assert built["optimizer"].param_groups[0]["initial_lr"] == 5e-4
    assert (train.scheduler, train.warmup_epochs, train.label_smoothing) == ("cosine", 1, 0.2)
    assert train.patience == train.max_epochs == 30 and train.batch_size == 256


def test_frozen_lite2_trains_the_frozen_lite0_head_and_recipe_on_260_px_features():
    p, lite0 = params("lite2"), params("frozen").model("lite0")
    lite2 = p.model("lite2")
    assert p.models == ("lite2",) and uses_features(lite2) and p.evaluate.hflip
    assert lite2.image_size == 260
    assert (lite2.head, lite2.train) == (lite0.head, lite0.train)


def test_fine_tuned_lite0_trains_every_layer_at_decaying_rates():
    p = random_weights_params("fine_tuned")
    lite0 = p.model("lite0")
    assert not uses_features(lite0) and p.evaluate.hflip
    net = build_net("lite0", lite0, 10, STATS)
    assert all(param.requires_grad for param in net.parameters())
    groups = param_groups("lite0", lite0, net)
    scales = [g["lr_scale"] for g in groups]
    assert scales[0] == 1.0 and scales[1] == pytest.approx(0.8) and scales == sorted(scales)[::-1]
    train = lite0.train
    module = Classifier(net, train, 10, pixels=True, param_groups=groups)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10 * 159, max_epochs=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["initial_lr"] for g in optimizer.param_groups[:2]] == pytest.approx([5e-4, 4e-4])
    assert optimizer.defaults["weight_decay"] == 0.05
    assert (train.crop, train.hflip, train.label_smoothing, train.warmup_epochs) == (
        4,
        True,
        0.1,
        1,
    )
    assert (train.scheduler, train.max_epochs, train.patience, train.batch_size) == (
        "cosine",
        10,
        10,
        256,
    )


@pytest.mark.parametrize(
    ("name", "blocks", "epochs", "precision"),
    [
        ("partial_top3", 3, 10, "32-true"),
        ("partial_top5", 5, 8, "32-true"),
        ("partial_top6", 6, 12, "bf16-mixed"),
    ],
)
def test_partly_fine_tuned_lite0_trains_its_top_blocks_from_cached_activations(
    name, blocks, epochs, precision
):
    p = random_weights_params(name)
    lite0 = p.model("lite0")
    assert cached_inputs("lite0", lite0, p.train.crop) == "activations" and p.train.hflip
    # Below the last one to four MBConv blocks (N = 3 to 6) at 224 px: 192 x 7 x 7 values an image.
    net = build_net("lite0", lite0, 10, STATS, activation_shape=(192, 7, 7)).eval()
    assert net(torch.zeros(2, 192 * 7 * 7)).shape == (2, 10)
    assert all(param.requires_grad for param in net.parameters())  # the top blocks + head
    assert len(net[1].blocks) == blocks
    assert linear_widths(net[2]) == [(1280, 2048), (2048, 10)]
    scales = [g["lr_scale"] for g in param_groups("lite0", lite0, net)]
    # head, then bn1, the head conv and the MBConv blocks, top first
    assert scales == pytest.approx([0.8**depth for depth in range(blocks + 1)])
    train = lite0.train
    assert (train.optimizer, train.lr, train.weight_decay, train.crop) == ("adamw", 5e-4, 0.05, 0)
    assert (train.max_epochs, train.patience) == (epochs, epochs)
    assert resolve_precision(train) == precision


def test_top6_head_first_is_the_top6_recipe_after_five_head_epochs():
    top6, head_first = params("partial_top6"), params("partial_top6_head")
    lite0 = head_first.model("lite0")
    assert trains_head_first(lite0) and not trains_head_first(top6.model("lite0"))
    assert (lite0.head_epochs, lite0.head_lr, lite0.featurize_precision) == (5, 1e-3, "bf16")
    # Nothing else differs: the same blocks, head, recipe, data and evaluation.
    same = dataclasses.replace(lite0, head_epochs=0, featurize_precision="auto")
    assert same == top6.model("lite0")
    assert (head_first.data, head_first.train, head_first.evaluate, head_first.models) == (
        top6.data,
        top6.train,
        top6.evaluate,
        top6.models,
    )


@pytest.mark.parametrize(("name", "mixup"), [("mlp_long", 0.0), ("mlp_mixup", 0.4)])
def test_the_long_mlps_are_the_strong_mlp_trained_160_epochs(name, mixup):
    strong, longer = params("mlp").model("mlp"), params(name).model("mlp")
    assert (longer.train.max_epochs, longer.train.patience, longer.train.mixup) == (160, 160, mixup)
    same = dataclasses.replace(longer.train, max_epochs=40, patience=40, mixup=0.0)
    assert same == strong.train
    assert dataclasses.replace(longer, train=strong.train) == strong
    module = Classifier(build_net("mlp", longer, 10, STATS), longer.train, 10, pixels=True)
    assert (module.mixup.alpha if module.mixup else 0.0) == mixup
