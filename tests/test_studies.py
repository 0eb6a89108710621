"""Each command of docs/results.md "Reproducing the original studies" parses, and each param of
it reaches the network, the optimizer or the trainer."""

from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, STATS, documented_commands, grid, linear_widths
from torch import nn

from transfer_study.core.config import load_params
from transfer_study.core.params_file import deep_merge
from transfer_study.nn.build import build_net
from transfer_study.train.module import Classifier
from transfer_study.train.optim import param_groups

SECTION = "Reproducing the original studies"
# The commands of that section, by their labels there: the tests below check each one's params.
NAMES = (
    "mlp64",
    "variants",
    "architectures",
    "activations",
    "optimizers",
    "augmentation",
    "vgg16",
    "inception",
    "resnet50",
    "search",
    "mnist",
    "unfreeze",
    "full_fine_tuning",
    "own_images",
)


def command(name):
    return documented_commands(SECTION)[name]


def study(name, index=0):
    return load_params(f"{REPO}/params.yaml", grid(command(name))[index])


def test_results_doc_gives_one_command_for_each_name():
    assert list(documented_commands(SECTION)) == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_command_parses(name):
    for index in range(len(grid(command(name)))):
        assert study(name, index).models


def test_mlp_rows_reach_the_network_and_the_optimizer():
    p = study("mlp64").model("mlp")
    net = build_net("mlp", p, 10, STATS)
    assert linear_widths(net) == [(3 * 64 * 64, 256), (256, 128), (128, 10)]
    assert any(isinstance(m, nn.ReLU) for m in net.modules())
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    assert (p.train.lr, p.train.max_epochs, p.train.patience, p.train.min_delta) == (
        1e-5,
        12,
        5,
        0.001,
    )
    arch = study("architectures").model("mlp")
    optimizer = Classifier(build_net("mlp", arch, 10, STATS), arch.train, 10)
    built = optimizer.configure_optimizers()
    assert isinstance(built, torch.optim.SGD) and built.defaults["momentum"] == 0.9
    assert built.param_groups[0]["lr"] == 0.02 and arch.train.batch_size == 32
    assert len(linear_widths(optimizer.net)) == 4


def test_l1_l2_and_dropout_reach_training():
    p = study("variants").model("mlp")
    net = build_net("mlp", p, 10, STATS)
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    module = Classifier(net, p.train, 10)
    assert module.configure_optimizers().defaults["weight_decay"] == 1e-4
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    batch = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10)
    torch.manual_seed(0)
    with_l1 = module.training_step(batch, 0)
    torch.manual_seed(0)
    plain = module._step(batch, "train")
    weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
    expected = 1e-5 * sum(w.abs().sum() for w in weights)
    torch.testing.assert_close(with_l1 - plain, expected)


def test_activation_and_optimizer_grids_reach_torch():
    activations = [nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Sigmoid, nn.Tanh]
    for index, cls in enumerate(activations):
        net = build_net("mlp", study("activations", index).model("mlp"), 10, STATS)
        assert any(type(m) is cls for m in net.modules())
    classes = [torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad, torch.optim.Adadelta]
    for index, cls in enumerate(classes):
        p = study("optimizers", index).model("mlp")
        module = Classifier(build_net("mlp", p, 10, STATS), p.train, 10)
        module._trainer = SimpleNamespace(estimated_stepping_batches=300, max_epochs=30)
        built = module.configure_optimizers()
        optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
        assert type(optimizer) is cls
        for _ in range(10):  # one epoch of 10 steps: then gamma 0.9 applies once
            optimizer.step()
            scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.9 * p.train.lr)


def test_augmentation_row():
    p = study("augmentation")
    assert p.model("mlp").train.crop == 4 and p.model("mlp").train.hflip
    assert p.model("vgg16").train.hflip and p.model("vgg16").train.crop == 0


def test_frozen_heads_rows():
    vgg = study("vgg16").model("vgg16")
    head = build_net("vgg16", vgg, 10, STATS, feature_dim=25088)
    assert linear_widths(head) == [(25088, 50), (50, 20), (20, 10)]
    assert any(isinstance(m, nn.ReLU) for m in head.modules())
    inception = study("inception").model("inception")
    assert inception.image_size == 299 and inception.trainable_layers == 0
    assert linear_widths(build_net("inception", inception, 10, STATS, 2048))[0][0] == 2048


def test_resnet50_row_fine_tunes_everything_with_adadelta():
    section = study("resnet50").model("resnet50")
    overrides = {"resnet50": {"weights": "none", "image_size": 32}}
    section = load_params(
        f"{REPO}/params.yaml", deep_merge(grid(command("resnet50"))[0], overrides)
    )
    net = build_net("resnet50", section.model("resnet50"), 10, STATS)
    assert all(p.requires_grad for p in net.parameters())
    assert linear_widths(net[1]) == [(2048, 1024), (1024, 256), (256, 64), (64, 16), (16, 10)]
    assert any(isinstance(m, nn.ELU) for m in net[1].modules())
    module = Classifier(net, section.model("resnet50").train, 10, pixels=True)
    assert isinstance(module.configure_optimizers(), torch.optim.Adadelta)


def test_search_grid_has_every_combination():
    lrs = sorted({study("search", i).train.lr for i in range(12)})
    assert lrs == [1e-4, 1e-3, 1e-2] and len(grid(command("search"))) == 12


def test_mnist_row():
    p = study("mnist")
    assert p.data.dataset == "mnist" and p.data.md5 == "official"
    net = build_net(
        "mlp", p.model("mlp"), 10, {"shape": [1, 28, 28], "mean": (0.1,), "std": (0.3,)}
    )
    assert linear_widths(net) == [(784, 128), (128, 10)]
    assert any(isinstance(m, nn.Sigmoid) for m in net.modules())


def test_partial_unfreezing_row():
    p = study("unfreeze").model("lite0")
    net = build_net(
        "lite0",
        load_params(
            f"{REPO}/params.yaml",
            deep_merge(
                grid(command("unfreeze"))[0], {"lite0": {"weights": "none", "image_size": 32}}
            ),
        ).model("lite0"),
        10,
        STATS,
    )
    groups = param_groups("lite0", p, net)
    assert [g["lr_scale"] for g in groups] == pytest.approx([1, 0.7, 0.49, 0.343])


def test_full_fine_tuning_row():
    lite0 = study("full_fine_tuning").model("lite0")
    assert (lite0.trainable_layers, lite0.lr_decay) == ("all", 0.8)
    assert (lite0.train.lr, lite0.train.hflip, lite0.train.crop) == (3e-4, True, 4)


def test_own_images_row():
    data = study("own_images").data
    assert (data.dataset, data.path, data.image_size) == ("folder", "path/to/images", 32)


@pytest.mark.parametrize(
    ("name", "models"),
    [
        ("mlp64", ("mlp",)),
        ("vgg16", ("vgg16",)),
        ("inception", ("inception",)),
        ("resnet50", ("resnet50",)),
        ("unfreeze", ("lite0",)),
        ("full_fine_tuning", ("lite0",)),
        ("augmentation", ("mlp", "vgg16", "inception", "lite0")),
    ],
)
def test_each_row_studies_only_its_models(name, models):
    assert study(name).models == models
