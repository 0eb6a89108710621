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
    weights_enum: type  # torchvision WeightsEnum: its DEFAULT says what "imagenet" means
    build: Callable[..., nn.Module]  # torchvision builder
    build_kwargs: dict
    to_body: Callable[[nn.Module], nn.Module]  # full model -> normalized images to flat features
    feature_dim: int
    min_size: int

    @property
    def input(self):
        transforms = self.weights_enum.DEFAULT.transforms()
        return InputSpec(
            default_size=transforms.crop_size[0],
            min_size=self.min_size,
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
        )


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


BACKBONES = {
    "vgg16": BackboneSpec(
        weights_enum=tvm.VGG16_Weights,
        build=tvm.vgg16,
        build_kwargs={},
        to_body=_vgg_body,
        feature_dim=512 * 7 * 7,
        min_size=32,
    ),
    "inception": BackboneSpec(
        weights_enum=tvm.Inception_V3_Weights,
        build=tvm.inception_v3,
        # The shape of torchvision's pretrained checkpoint, so its state_dict loads as is.
        build_kwargs={"aux_logits": True, "init_weights": False, "transform_input": True},
        to_body=_inception_body,
        feature_dim=2048,
        min_size=75,
    ),
}

MLP_INPUT = InputSpec(default_size=32, min_size=4, mean=CIFAR_MEAN, std=CIFAR_STD)
MODEL_NAMES = ("mlp", *BACKBONES)


def backbone_spec(name):
    """The registry entry for `name`; an unknown name is an error listing the valid ones."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone '{name}' (valid: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def _load_torchvision(spec, weights):
    if weights == "imagenet":
        try:
            return spec.build(weights=spec.weights_enum.DEFAULT, **spec.build_kwargs)
        except OSError as error:  # URLError is an OSError
            raise UserError(
                f"could not get ImageNet weights ({error}); without a network, copy "
                f"{spec.weights_enum.DEFAULT.url.rsplit('/', 1)[-1]} into "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or set weights to a "
                "state_dict path or none"
            ) from None
    model = spec.build(weights=None, **spec.build_kwargs)
    if weights != "none":
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise UserError(f"weights file {weights} does not fit this backbone: {first}") from None
    return model


def feature_extractor(name, weights, image_size):
    """uint8 images -> flat features: preprocessing (resize, normalize) + the backbone body."""
    spec = backbone_spec(name)
    body = spec.to_body(_load_torchvision(spec, weights))
    return nn.Sequential(Preprocess(image_size, spec.input.mean, spec.input.std), body)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
