"""Every registered model builds, has the right shapes, and freezing means frozen."""

import pytest
import torch
import yaml
from helpers import REPO, RunsCode
from torch import nn
from torchvision import models as tvm

from transfer_study.core.config import ACTIVATIONS, parse_params
from transfer_study.core.params_file import deep_merge
from transfer_study.core.stage import UserError
from transfer_study.inference import prepare_extractor
from transfer_study.nn.backbones import BACKBONES, backbone_spec, count_params, feature_extractor
from transfer_study.nn.build import build_net
from transfer_study.nn.layers import Residual, mlp
from transfer_study.train.module import Classifier
from transfer_study.train.optim import param_groups

# Every hand-registered backbone, and torchvision models taken by name (one per family kind:
# a ResNet's fc, a MobileNet's classifier Sequential, a ConvNeXt's norm-flatten-linear head).
MODELS = [*BACKBONES, "resnet18", "mobilenet_v3_small", "convnext_tiny"]
STATS = {"shape": [3, 32, 32], "mean": (0.5,) * 3, "std": (0.25,) * 3}  # what build_net needs


def images(n, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("name", MODELS)
def test_feature_extractor_at_its_minimum_size(name):
    spec = backbone_spec(name)
    extractor = feature_extractor(name, "none", spec.input.min_size)
    extractor = prepare_extractor(extractor, torch.device("cpu"))
    features = extractor(images(2))
    assert features.shape == (2, spec.feature_dim)
    assert count_params(extractor, trainable_only=True) == 0
    assert not extractor.training


@pytest.mark.parametrize("name", list(BACKBONES))
def test_input_spec_matches_the_weights(name):
    expected = {  # (default size, minimum size, mean of the first channel, its std)
        "vgg16": (224, 32, 0.485, 0.229),
        "inception": (299, 75, 0.485, 0.229),
        "lite0": (224, 32, 127 / 255, 128 / 255),  # TF-style (pixel - 127) / 128
        "lite1": (240, 32, 127 / 255, 128 / 255),
        "lite2": (260, 32, 127 / 255, 128 / 255),
    }[name]
    spec = backbone_spec(name).input
    assert (spec.default_size, spec.min_size, spec.mean[0], spec.std[0]) == expected


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(UserError) as error:
        backbone_spec("resnet")
    assert (
        "unknown backbone 'resnet' (valid: vgg16, inception, lite0, lite1, lite2, or a torchvision"
        in str(error.value)
    )
    assert "resnet50" in str(error.value)


def test_image_size_below_the_backbone_minimum_names_the_key():
    with pytest.raises(UserError, match=r"inception.image_size = 74: accepts an integer >= 75"):
        feature_extractor("inception", "none", 74)


def test_inception_trains_without_its_auxiliary_head():
    extractor = feature_extractor("inception", "none", 75).train()
    out = extractor(images(2))  # train mode: a plain tensor, not InceptionOutputs
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2048)
    out.sum().backward()


def section(name, **overrides):
    """The model's section of params.yaml with `overrides`; a torchvision model by name without a
    section gets resnet50's, frozen."""
    raw = yaml.safe_load(open(f"{REPO}/params.yaml"))
    if name not in raw:
        overrides = {**raw["resnet50"], "trainable_layers": 0, "train": {}, **overrides}
    # parse_params: a torchvision model by name has no stages in dvc.yaml to check.
    raw = deep_merge(raw, {"models": {name: True}, name: overrides})
    return parse_params(raw).model(name)


@pytest.mark.parametrize("name", MODELS)
def test_features_then_head_equals_the_full_frozen_model(name):
    torch.manual_seed(0)
    spec = backbone_spec(name)
    full = build_net(
        name,
        section(name, weights="none", trainable_layers="all", image_size=spec.input.min_size),
        10,
        STATS,
    ).eval()
    extractor, head = full
    batch = images(3)
    with torch.no_grad():
        torch.testing.assert_close(head(extractor(batch)), full(batch))
    # Frozen, the trainable network is the head alone, fed with cached features.
    frozen = build_net(name, section(name, weights="none"), 10, STATS, spec.feature_dim)
    assert frozen[0].in_features == spec.feature_dim


def test_head_shapes():
    head = mlp(25088, (50, 20), 10, "relu", 0.0)
    widths = [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]
    assert widths == [(25088, 50), (50, 20), (20, 10)]


TORCH_ACTIVATIONS = {  # written out, not looked up: a wrong entry in params.ACTIVATIONS fails
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_reaches_the_network(activation):
    net = build_net("mlp", section("mlp", activation=activation, hidden=[8]), 10, STATS)
    assert any(type(m) is TORCH_ACTIVATIONS[activation] for m in net.modules())
    assert net(images(4)).shape == (4, 10)


def test_mlp_resizes_its_input():
    net = build_net("mlp", section("mlp", image_size=16, hidden=[8]), 10, STATS)
    assert net[2][0].in_features == 3 * 16 * 16
    assert net(images(2)).shape == (2, 10)


def test_grayscale_feeds_the_mlp_and_rgb_backbones():
    gray = images(2)[:, :1]
    stats = {"shape": [1, 32, 32], "mean": (0.5,), "std": (0.25,)}
    net = build_net("mlp", section("mlp", hidden=[8]), 10, stats)
    assert net[2][0].in_features == 32 * 32 and net(gray).shape == (2, 10)
    extractor = feature_extractor("lite0", "none", 32).eval()
    with torch.no_grad():  # one channel replicated to three = the RGB image of equal channels
        torch.testing.assert_close(extractor(gray), extractor(gray.expand(-1, 3, -1, -1)))


def trainable_layers_net(name, layers, **overrides):
    fields = {"weights": "none", "trainable_layers": layers, "image_size": 32, **overrides}
    return build_net(name, section(name, **fields), 10, STATS)


@pytest.mark.parametrize(("layers", "trainable_convs"), [(2, 2), (13, 13), ("all", 13)])
def test_trainable_layers_trains_the_top_blocks(layers, trainable_convs):
    extractor, head = trainable_layers_net("vgg16", layers)
    convs = [m for m in extractor.modules() if isinstance(m, nn.Conv2d)]
    flags = [m.weight.requires_grad for m in convs]
    assert flags == [False] * (13 - trainable_convs) + [True] * trainable_convs
    assert all(p.requires_grad for p in head.parameters())


def test_trainable_layers_beyond_the_backbone_is_an_error():
    with pytest.raises(UserError, match="vgg16.trainable_layers = 14: vgg16 has 13 blocks"):
        trainable_layers_net("vgg16", 14)


def test_frozen_modules_stay_in_eval_mode_while_training():
    net = trainable_layers_net("resnet18", 1)  # the last BasicBlock of layer4 trains
    module = Classifier(net, section("resnet18").train, 10, pixels=True).train()
    body = net[0][1]
    assert not body.bn1.training and not body.layer4[0].bn1.training
    assert body.layer4[1].bn1.training and body.layer4[1].bn1.weight.requires_grad
    assert module.training
    # Lite's frozen blocks drop no connection in training (it would make their output random):
    # in train mode they give what featurize caches below the cut, every time.
    net = trainable_layers_net("lite0", 3, weights="imagenet")  # random: zeros past block 1
    Classifier(net, section("lite0").train, 10, pixels=True).train()
    stages = backbone_spec("lite0").stages(net[0][1])
    frozen = [m for m in stages if not any(p.requires_grad for p in m.parameters())]
    assert 0 < len(frozen) < len(stages) and not any(m.block.training for m in frozen[1:])
    below = torch.nn.Sequential(net[0][0], *frozen)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(below(images), below(images))


def test_lr_decay_gives_each_block_its_rate():
    fields = {"weights": "none", "trainable_layers": 2, "image_size": 32, "lr_decay": 0.5}
    resnet = section("resnet18", **fields, train={"lr": 0.01, "optimizer": "sgd"})
    net = build_net("resnet18", resnet, 10, STATS)
    groups = param_groups("resnet18", resnet, net)
    optimizer = Classifier(net, resnet.train, 10, True, groups).configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == [0.01, 0.005, 0.0025]  # head, layer4[1], layer4[0]
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable


def test_lr_decay_from_cached_activations_gives_each_block_above_the_cut_its_rate():
    fields = {"weights": "none", "trainable_layers": 3, "image_size": 32, "lr_decay": 0.5}
    lite0 = section("lite0", **fields, train={"lr": 0.01})
    net = build_net("lite0", lite0, 10, STATS, activation_shape=[192, 1, 1])
    groups = param_groups("lite0", lite0, net)
    # head, then bn1, the head conv and the last MBConv block: the top 3 blocks, top first
    assert [g["lr_scale"] for g in groups] == [1.0, 0.5, 0.25, 0.125]
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable


def test_damaged_weights_files_get_one_line_and_run_nothing(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(tvm.resnet18().state_dict(), good)
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    hostile, sentinel = tmp_path / "hostile.pth", tmp_path / "sentinel"
    torch.save({"weight": RunsCode(sentinel)}, hostile)
    for path in (text, truncated, hostile):
        with pytest.raises(UserError, match=f"weights file {path} is not a state_dict"):
            feature_extractor("resnet18", str(path), 32)
    assert not sentinel.exists()
    assert feature_extractor("resnet18", str(good), 32) is not None


def test_mlp_norm_and_residual_layers():
    net = build_net(
        "mlp", section("mlp", hidden=[64, 64, 32], norm="batch", residual=True), 10, STATS
    ).eval()
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.modules()) == 3
    (skip,) = [m for m in net.modules() if isinstance(m, Residual)]  # 64 -> 64 only
    assert skip[0].in_features == skip[0].out_features == 64
    # The block adds its input back: with its Linear zeroed, it passes the input through.
    torch.nn.init.zeros_(skip[0].weight)
    torch.nn.init.zeros_(skip[0].bias)
    x = torch.randn(4, 64)
    torch.testing.assert_close(skip(x), x)  # batch norm (eval) and activation map 0 to 0
    net = build_net("mlp", section("mlp", norm="layer"), 10, STATS)
    assert sum(isinstance(m, nn.LayerNorm) for m in net.modules()) == 2
    assert not any(isinstance(m, Residual) for m in net.modules())
