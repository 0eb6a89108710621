"""What each params key accepts, and the checks: a bad value stops with one line naming the key."""

import contextlib
import dataclasses
import re
import reprlib
import types
import typing

from transfer_study.core import paths
from transfer_study.core.stage import UserError
from transfer_study.data.catalog import BAD_IMAGES, DATASETS

# What each key accepts. No torch here: a stage decides what to do before paying for its import.

ACTIVATIONS = {  # name -> torch.nn class
    "relu": "ReLU",
    "leaky_relu": "LeakyReLU",
    "elu": "ELU",
    "silu": "SiLU",
    "gelu": "GELU",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
}
OPTIMIZERS = {  # name -> (torch.optim class, the TrainParams fields it takes besides lr and L2)
    "adam": ("Adam", ()),
    "adamw": ("AdamW", ()),
    "sgd": ("SGD", ("momentum",)),
    "rmsprop": ("RMSprop", ("momentum",)),
    "adagrad": ("Adagrad", ()),
    "adadelta": ("Adadelta", ()),
}
SCHEDULERS = ("none", "exponential", "cosine")
NORMS = {"none": None, "batch": "BatchNorm1d", "layer": "LayerNorm"}  # name -> torch.nn class
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true")
MLP_MIN_SIZE = 4  # pixels; a backbone's smallest input is its registry entry's (nn/backbones.py)
MLP_MAX_SIZE = 256  # pixels: 3 x 256 x 256 inputs already make a 50M-weight first layer
MAX_IMAGE_SIZE = 1024  # pixels, for stored and backbone images: 4x ImageNet's usual input
# Far above any lr that trains; Adam's first step divides the lr by 0.1 in float32, so an lr
# near 1e38 overflowed there with a traceback.
MAX_LR = 1e6
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
MAX_RENDEZVOUS_SECONDS = 86_400  # a day: longer is a hang by another name
DEFAULT_DATA_PATH = "data/images"
COMMON_KEYS = ("seed", "models", "data", "train", "evaluate")


class ParamsError(UserError):
    """A key of params.yaml is missing, unknown, of the wrong type or out of range."""


# Values and keys are echoed in a bounded form: a YAML alias bomb (a list nesting itself by
# reference, billions of leaves) or a 50 MB string comes back in at most MAX_SHOWN characters.
_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel = 2
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = _BOUNDED.maxset = 4
_BOUNDED.maxstring = _BOUNDED.maxother = 40
_BOUNDED.maxlong = 24
MAX_SHOWN = 80  # characters


def shown(value):
    """`value` as a short repr, for an error line."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def parse_fields(cls, raw, where):
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {shown(raw)}")
    names = [field.name for field in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ParamsError(f"unknown key {shown(f'{where}.{key}')} (valid: {', '.join(names)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in names:
        if name not in raw:
            raise ParamsError(f"missing key '{where}.{name}'")
        values[name] = coerce(hints[name], raw[name], f"{where}.{name}")
    return cls(**values)


_KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def coerce(kind, value, key):
    if dataclasses.is_dataclass(kind):
        return parse_fields(kind, value, key)
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`, `int | str`
        if value is None and type(None) in args:
            return None
        *others, last = (a for a in args if a is not type(None))
        for option in others:
            with contextlib.suppress(ParamsError):
                return coerce(option, value, key)
        return coerce(last, value, key)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {shown(value)}")
        return tuple(coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if kind is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as the string '1e-4'.
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ParamsError(f"{key}: expected an integer, got {shown(value)}")
    if not isinstance(value, kind):
        raise ParamsError(f"{key}: expected {_KIND_NAMES[kind]}, got {shown(value)}")
    return value


def _check(ok, key, value, accepts):
    if not ok:
        raise ParamsError(f"{key} = {shown(value)}: accepts {accepts}")


def _one_of(key, value, valid):
    _check(value in valid, key, value, "one of " + ", ".join(valid))


def check_train(train, where):
    _one_of(f"{where}.optimizer", train.optimizer, tuple(OPTIMIZERS))
    _one_of(f"{where}.scheduler", train.scheduler, SCHEDULERS)
    _one_of(f"{where}.accelerator", train.accelerator, ACCELERATORS)
    _one_of(f"{where}.precision", train.precision, PRECISIONS)
    _one_of(f"{where}.strategy", train.strategy, STRATEGIES)
    _check(0 < train.lr <= MAX_LR, f"{where}.lr", train.lr, f"a number > 0, at most {MAX_LR:,.0f}")
    _check(0 <= train.momentum < 1, f"{where}.momentum", train.momentum, "a number in [0, 1)")
    for name in ("weight_decay", "l1", "min_delta"):
        value = getattr(train, name)
        _check(value >= 0, f"{where}.{name}", value, "a number >= 0")
    _check(0 < train.gamma <= 1, f"{where}.gamma", train.gamma, "a number in (0, 1]")
    _check(
        0 <= train.label_smoothing < 1,
        f"{where}.label_smoothing",
        train.label_smoothing,
        "a number in [0, 1)",
    )
    for name, low in (
        ("batch_size", 1),
        ("max_epochs", 1),
        ("patience", 0),
        ("crop", 0),
        ("devices", 1),
        ("num_nodes", 1),
    ):
        value = getattr(train, name)
        _check(value >= low, f"{where}.{name}", value, f"an integer >= {low}")
    _check(
        0 < train.rendezvous_timeout <= MAX_RENDEZVOUS_SECONDS,
        f"{where}.rendezvous_timeout",
        train.rendezvous_timeout,
        f"a number of seconds > 0 and at most {MAX_RENDEZVOUS_SECONDS:,} (a day)",
    )
    _check(
        train.per_class is None or train.per_class >= 1,
        f"{where}.per_class",
        train.per_class,
        "null (every train image) or an integer >= 1: labeled train images of each class",
    )
    # After max_epochs' own check: max_epochs = 0 is reported as itself, not as warm-up's bound.
    _check(
        0 <= train.warmup_epochs < train.max_epochs,
        f"{where}.warmup_epochs",
        train.warmup_epochs,
        f"a number >= 0 and below max_epochs ({train.max_epochs})",
    )


def _validate_layers(section, where):
    _one_of(f"{where}.activation", section.activation, tuple(ACTIVATIONS))
    _check(0 <= section.dropout < 1, f"{where}.dropout", section.dropout, "a number in [0, 1)")
    for width in section.hidden:
        _check(width >= 1, f"{where}.hidden", list(section.hidden), "a list of integers >= 1")


def _validate_data(data):
    _one_of("data.dataset", data.dataset, tuple(DATASETS))
    _one_of("data.bad_images", data.bad_images, BAD_IMAGES)
    files = len(DATASETS[data.dataset].files)
    _check(
        data.md5 in ("official", None) or (files == 1 and re.fullmatch("[0-9a-f]{32}", data.md5)),
        "data.md5",
        data.md5,
        "official, null (no check)" + (" or a 32-digit hex md5" if files == 1 else ""),
    )
    if data.dataset == "folder":
        _check(
            data.image_size is not None and 8 <= data.image_size <= MAX_IMAGE_SIZE,
            "data.image_size",
            data.image_size,
            f"an integer from 8 to {MAX_IMAGE_SIZE}: the size folder images are stored at",
        )
    else:
        # split lists data.path as a dependency: DVC would hash whatever folder it names.
        _check(
            data.path == DEFAULT_DATA_PATH,
            "data.path",
            data.path,
            f"{DEFAULT_DATA_PATH} for {data.dataset} (only the folder dataset reads data.path)",
        )
        _check(
            data.image_size is None,
            "data.image_size",
            data.image_size,
            f"null for {data.dataset} (its images keep their size; each model resizes its input)",
        )


def _validate_backbone(name, section):
    _validate_layers(section.head, f"{name}.head")
    # The smallest size is the registry's, checked where the backbone is built (nn/backbones.py).
    _check(
        section.image_size <= MAX_IMAGE_SIZE,
        f"{name}.image_size",
        section.image_size,
        f"an integer up to {MAX_IMAGE_SIZE}",
    )
    weights = section.weights
    _check(
        weights in ("imagenet", "none") or paths.user_path(weights).is_file(),
        f"{name}.weights",
        weights,
        "imagenet, none or the path of an existing state_dict file",
    )
    layers = section.trainable_layers
    _check(
        layers == "all" or (isinstance(layers, int) and layers >= 0),
        f"{name}.trainable_layers",
        layers,
        "an integer >= 0 (0 = frozen backbone, cached features) or all",
    )
    _check(0 < section.lr_decay <= 1, f"{name}.lr_decay", section.lr_decay, "a number in (0, 1]")


def check_params(params):
    data = params.data
    _validate_data(data)
    _check(0 <= params.seed <= MAX_SEED, "seed", params.seed, f"an integer from 0 to {MAX_SEED}")
    _check(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "a number in (0, 1)")
    for name in ("train_size", "test_size"):
        value = getattr(data, name)
        _check(value is None or value >= 10, f"data.{name}", value, "null or an integer >= 10")
    for name, section in params.model_sections.items():
        check_train(section.train, f"{name}.train")
        if name == "mlp":
            _validate_layers(section, name)
            _one_of("mlp.norm", section.norm, tuple(NORMS))
            widths = section.hidden
            _check(
                not section.residual or any(a == b for a, b in zip(widths, widths[1:])),
                "mlp.residual",
                section.residual,
                f"false with mlp.hidden = {list(widths)}: a skip connection needs two hidden "
                "layers in a row of one width, e.g. [1024, 1024]",
            )
            _check(
                MLP_MIN_SIZE <= section.image_size <= MLP_MAX_SIZE,
                "mlp.image_size",
                section.image_size,
                f"an integer from {MLP_MIN_SIZE} to {MLP_MAX_SIZE}",
            )
        else:
            _validate_backbone(name, section)
            # Only for models in the study, so that a shared train.crop can still be set while
            # frozen backbones sit out.
            crops_features = section.trainable_layers == 0 and section.train.crop > 0
            _check(
                name not in params.models or not crops_features,
                f"{name}.train.crop",
                section.train.crop,
                f"0 while {name}.trainable_layers is 0: cached features cannot be cropped (crop "
                f"only the models that see pixels, e.g. mlp.train.crop, or fine-tune {name})",
            )
