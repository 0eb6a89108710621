"""Each row of docs/results.md "Reproducing the original studies" is one command, and each
param of it reaches the network, the optimizer or the trainer."""

import re
import shlex
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from torch import nn

from transfer_study.bench.study import parse_assignment
from transfer_study.core.config import deep_merge, load_params
from transfer_study.nn.build import build_net
from transfer_study.train.fit import Classifier, param_groups

# `models` switches that leave one model in the study (from the committed params.yaml).
ONLY_MLP = "-S 'models={vgg16: false, inception: false, lite0: false}'"
ONLY_VGG16 = "-S 'models={mlp: false, inception: false, lite0: false}'"
ONLY_INCEPTION = "-S 'models={mlp: false, vgg16: false, lite0: false}'"
ONLY_RESNET50 = (
    "-S 'models={mlp: false, vgg16: false, inception: false, lite0: false, resnet50: true}'"
)
ONLY_LITE0 = "-S 'models={mlp: false, vgg16: false, inception: false}'"
# The commands as docs/results.md gives them (the test below checks that it does, verbatim).
STUDIES = {
    "mlp64": f"dvc exp run {ONLY_MLP} -S mlp.image_size=64 -S 'mlp.hidden=[256,128]' "
    "-S mlp.activation=relu -S mlp.dropout=0 -S ++mlp.train.lr=1e-5 -S ++mlp.train.max_epochs=12 "
    "-S ++mlp.train.patience=5",
    "variants": f"dvc exp run {ONLY_MLP} -S 'mlp.hidden=[64,16]' -S mlp.dropout=0.5 "
    "-S ++mlp.train.l1=1e-5 -S ++mlp.train.weight_decay=1e-4 -S ++mlp.train.batch_size=1024",
    "architectures": f"dvc exp run {ONLY_MLP} -S 'mlp.hidden=[1536,768,384]' "
    "-S mlp.activation=relu -S mlp.dropout=0 -S ++mlp.train.optimizer=sgd -S ++mlp.train.lr=0.02 "
    "-S ++mlp.train.momentum=0.9 -S ++mlp.train.batch_size=32 -S ++mlp.train.max_epochs=50",
    "activations": f"dvc exp run --queue {ONLY_MLP} "
    "-S 'mlp.activation=relu,leaky_relu,elu,silu,sigmoid,tanh'",
    "optimizers": f"dvc exp run --queue {ONLY_MLP} "
    "-S 'train.optimizer=sgd,adam,adagrad,adadelta' -S train.scheduler=exponential "
    "-S train.gamma=0.9",
    "augmentation": "dvc exp run -S train.hflip=true -S ++mlp.train.crop=4",
    "vgg16": f"dvc exp run {ONLY_VGG16} -S 'vgg16.head.hidden=[50,20]' "
    "-S vgg16.head.activation=relu",
    "inception": f"dvc exp run {ONLY_INCEPTION}",
    "resnet50": f"dvc exp run {ONLY_RESNET50}",
    "search": "dvc exp run --queue -S 'train.lr=1e-2,1e-3,1e-4' -S 'train.batch_size=64,256' "
    "-S 'train.max_epochs=10,30'",
    "mnist": f"dvc exp run -S data.dataset=mnist {ONLY_MLP} -S mlp.image_size=28 "
    "-S 'mlp.hidden=[128]' -S mlp.activation=sigmoid -S mlp.dropout=0 "
    "-S ++mlp.train.optimizer=sgd -S ++mlp.train.lr=0.1",
    "unfreeze": f"dvc exp run {ONLY_LITE0} -S lite0.trainable_layers=3 "
    "-S lite0.lr_decay=0.7 -S ++lite0.train.lr=1e-4",
}


def grid(command):
    """Every params override a command sets: one per combination of a queued grid's values,
    each `-S key=value` parsed as DVC parses it (the study timer's parser)."""
    combos = [{}]
    args = shlex.split(command)
    for flag, assignment in zip(args, args[1:]):
        if flag != "-S":
            continue
        key, value = assignment.split("=", 1)
        choices = (
            value.split(",") if "--queue" in args and not value.startswith(("[", "{")) else [value]
        )
        nested = [parse_assignment(f"{key}={choice}") for choice in choices]
        combos = [deep_merge(c, n) for c in combos for n in nested]
    return combos


def study(name, index=0):
    return load_params(f"{REPO}/params.yaml", grid(STUDIES[name])[index])


def linear_widths(net):
    return [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]


STATS = {"shape": [3, 32, 32], "mean": (0.5,) * 3, "std": (0.25,) * 3}


def test_results_doc_gives_every_command_verbatim():
    results = open(f"{REPO}/docs/results.md").read()
    section = results.split("## Reproducing the original studies")[1].split("\n## ")[0]
    flat = re.sub(r"\s*\\\n\s*", " ", section)
    for name, command in STUDIES.items():
        assert command in flat, name


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_command_parses(name):
    for index in range(len(grid(STUDIES[name]))):
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
        f"{REPO}/params.yaml", deep_merge(grid(STUDIES["resnet50"])[0], overrides)
    )
    net = build_net("resnet50", section.model("resnet50"), 10, STATS)
    assert all(p.requires_grad for p in net.parameters())
    assert linear_widths(net[1]) == [(2048, 1024), (1024, 256), (256, 64), (64, 16), (16, 10)]
    assert any(isinstance(m, nn.ELU) for m in net[1].modules())
    module = Classifier(net, section.model("resnet50").train, 10, pixels=True)
    assert isinstance(module.configure_optimizers(), torch.optim.Adadelta)


def test_search_grid_has_every_combination():
    lrs = sorted({study("search", i).train.lr for i in range(12)})
    assert lrs == [1e-4, 1e-3, 1e-2] and len(grid(STUDIES["search"])) == 12


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
                grid(STUDIES["unfreeze"])[0], {"lite0": {"weights": "none", "image_size": 32}}
            ),
        ).model("lite0"),
        10,
        STATS,
    )
    groups = param_groups("lite0", p, net)
    assert [g["lr_scale"] for g in groups] == pytest.approx([1, 0.7, 0.49, 0.343])


@pytest.mark.parametrize(
    ("name", "models"),
    [
        ("mlp64", ("mlp",)),
        ("vgg16", ("vgg16",)),
        ("inception", ("inception",)),
        ("resnet50", ("resnet50",)),
        ("unfreeze", ("lite0",)),
        ("augmentation", ("mlp", "vgg16", "inception", "lite0")),
    ],
)
def test_each_row_studies_only_its_models(name, models):
    assert study(name).models == models
