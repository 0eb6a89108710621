"""Every registered model builds, has the right shapes, and freezing means frozen."""

import pytest
import torch
from conftest import REPO
from torch import nn

from transfer_study.errors import UserError
from transfer_study.features import prepare_extractor
from transfer_study.models import BACKBONES, backbone_spec, count_params, feature_extractor
from transfer_study.nets import ACTIVATIONS, Preprocess, mlp
from transfer_study.params import load_params
from transfer_study.training import build_net


def images(n, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("name", list(BACKBONES))
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
    }[name]
    spec = backbone_spec(name).input
    assert (spec.default_size, spec.min_size, spec.mean[0], spec.std[0]) == expected


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(
        UserError, match="unknown backbone 'resnet' \\(valid: vgg16, inception, lite0\\)"
    ):
        backbone_spec("resnet")


def test_inception_trains_without_its_auxiliary_head():
    extractor = feature_extractor("inception", "none", 75).train()
    out = extractor(images(2))  # train mode: a plain tensor, not InceptionOutputs
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2048)
    out.sum().backward()


def section(name, **overrides):
    return load_params(f"{REPO}/params.yaml", {name: overrides}).model(name)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_features_then_head_equals_the_full_frozen_model(name):
    torch.manual_seed(0)
    spec = backbone_spec(name)
    full = build_net(
        name,
        section(name, weights="none", freeze=False, image_size=spec.input.min_size),
        num_classes=10,
    ).eval()
    extractor, head = full
    batch = images(3)
    with torch.no_grad():
        torch.testing.assert_close(head(extractor(batch)), full(batch))
    # Frozen, the trainable network is the head alone, fed with cached features.
    frozen = build_net(name, section(name, weights="none"), 10, feature_dim=spec.feature_dim)
    assert frozen[0].in_features == spec.feature_dim


def test_head_shapes():
    head = mlp(25088, (50, 20), 10, "relu", 0.0)
    widths = [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)]
    assert widths == [(25088, 50), (50, 20), (20, 10)]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_reaches_the_network(activation):
    net = build_net("mlp", section("mlp", activation=activation, hidden=[8]), num_classes=10)
    assert any(isinstance(m, ACTIVATIONS[activation]) for m in net.modules())
    assert net(images(4)).shape == (4, 10)


def test_mlp_resizes_its_input():
    net = build_net("mlp", section("mlp", image_size=16, hidden=[8]), num_classes=10)
    assert net[2][0].in_features == 3 * 16 * 16
    assert net(images(2)).shape == (2, 10)


def test_weights_from_a_state_dict_file(tmp_path):
    spec = BACKBONES["inception"]
    torch.manual_seed(1)
    model = spec.load("none", 75)
    torch.save(model.state_dict(), tmp_path / "inception.pth")  # as torchvision ships weights
    loaded = feature_extractor("inception", str(tmp_path / "inception.pth"), 75).eval()
    expected = nn.Sequential(Preprocess(75, spec.input.mean, spec.input.std), spec.to_body(model))
    batch = images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), expected.eval()(batch))


def test_weights_file_of_another_model_is_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit this backbone"):
        feature_extractor("inception", str(tmp_path / "other.pth"), 75)


def test_imagenet_weights_offline_say_where_to_put_them(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as error:
        feature_extractor("inception", "imagenet", 299)
    message = str(error.value)
    assert "inception_v3_google-0cc3c7bd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
