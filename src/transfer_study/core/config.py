"""params.yaml parsed once into frozen dataclasses; a bad value stops with one line naming it."""

import contextlib
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

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
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
DEFAULT_DATA_PATH = "data/images"
COMMON_KEYS = ("seed", "models", "data", "train", "evaluate")


class ParamsError(UserError):
    """A key of params.yaml is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class DataParams:
    dataset: str  # a name in datasets.DATASETS
    url: str  # "official", or where the dataset's files are (see download.download_dataset)
    md5: str | None  # "official", null (no check), or the digest of a one-file mirror
    path: str  # folder dataset: the folder of class folders
    image_size: int | None  # folder dataset: pixels, square, that images are stored at
    bad_images: str  # folder dataset: fail or skip on unreadable image files
    val_fraction: float
    train_size: int | None  # images drawn from the official train set, before the val split
    test_size: int | None


@dataclass(frozen=True)
class TrainParams:
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    l1: float
    scheduler: str
    gamma: float
    warmup_epochs: float  # lr rises linearly from ~0 over these epochs, then follows `scheduler`
    label_smoothing: float  # share of each train target spread over the other classes
    batch_size: int
    max_epochs: int
    patience: int  # epochs without val_loss improvement before stopping
    min_delta: float  # smallest val_loss decrease that counts as improvement
    hflip: bool  # random horizontal flips, train split only, for models that see pixels
    crop: int  # pixels of zero padding for random crops, train split only; 0 = off
    accelerator: str
    devices: int  # per node
    num_nodes: int
    strategy: str
    precision: str
    compile: bool  # torch.compile the network (measured: see README, Performance)
    deterministic: bool  # deterministic algorithms only (CUDA: slower; see README)
    resume: bool  # continue an interrupted run of the same configuration from its checkpoint


@dataclass(frozen=True)
class HeadParams:
    hidden: tuple[int, ...]
    activation: str
    dropout: float


@dataclass(frozen=True)
class MlpParams:
    image_size: int
    hidden: tuple[int, ...]
    activation: str
    dropout: float
    norm: str  # a name in NORMS: a normalization layer after each hidden Linear
    residual: bool  # hidden layers of equal width add their input back (skip connections)
    train: TrainParams


@dataclass(frozen=True)
class EvaluateParams:
    hflip: bool  # average each test prediction over the image and its mirror image


@dataclass(frozen=True)
class BackboneParams:
    weights: str  # imagenet | none | path to a torchvision state_dict
    image_size: int
    # Blocks of the backbone trained, counted from its top: 0 trains a head on cached features;
    # N > 0 or "all" fine-tune from images.
    trainable_layers: int | str
    lr_decay: float  # lr factor per block going down from the head (layer-wise decay)
    head: HeadParams
    train: TrainParams


@dataclass(frozen=True)
class Params:
    seed: int
    models: tuple[str, ...]  # the models in the study (`models: {name: true}`), in report order
    data: DataParams
    train: TrainParams
    evaluate: EvaluateParams
    model_sections: dict  # every model of `models`, in or out -> MlpParams | BackboneParams

    def model(self, name):
        return self.model_sections[name]


def uses_features(section):
    """Frozen backbones train a head on cached features; everything else sees pixels."""
    return isinstance(section, BackboneParams) and section.trainable_layers == 0


def read_params(path="params.yaml"):
    """params.yaml as YAML read it, not yet validated; unreadable: one line."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ParamsError(f"cannot read {path}: {error}") from None


def load_params(path="params.yaml", overrides=None):
    """Parse and validate params.yaml (with optional nested `overrides`) into Params."""
    params = parse_params(deep_merge(read_params(path), overrides or {}))
    check_stages(params, Path(path).parent / "dvc.yaml")
    return params


def parse_params(raw):
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml must be a mapping of keys to values")
    for key in COMMON_KEYS:
        if key not in raw:
            raise ParamsError(f"missing key '{key}'")
    switches = _parse_models(raw["models"])
    for key in raw:
        if key not in COMMON_KEYS and key not in switches:
            raise ParamsError(
                f"unknown key '{key}' (valid: {', '.join(COMMON_KEYS)}, or the section of a "
                f"model listed in `models`: {', '.join(switches)})"
            )
    for name in switches:
        if name not in raw:
            raise ParamsError(f"models lists '{name}', which has no section in params.yaml")
    shared_train = raw["train"]
    # The shared section first, so that its errors name `train.<key>`, not a model's copy.
    train = _parse(TrainParams, shared_train, "train")
    _validate_train(train, "train")
    sections = {}
    for name in switches:
        section = raw[name]
        if not isinstance(section, dict):
            raise ParamsError(f"{name}: expected a mapping, got {section!r}")
        # A model's own `train:` overrides the shared section, key by key.
        merged = {**section, "train": deep_merge(shared_train, section.get("train") or {})}
        sections[name] = parse_section(name, merged)
    params = Params(
        seed=_coerce(int, raw["seed"], "seed"),
        models=tuple(name for name, on in switches.items() if on),
        data=_parse(DataParams, raw["data"], "data"),
        train=train,
        evaluate=_parse(EvaluateParams, raw["evaluate"], "evaluate"),
        model_sections=sections,
    )
    _validate(params)
    return params


def check_stages(params, dvc_yaml):
    """Every model in the study has its stages in dvc.yaml: otherwise the pipeline would run to
    evaluate and fail there, for want of a model file DVC never asked for."""
    try:
        stages = yaml.safe_load(Path(dvc_yaml).read_text()).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return  # no pipeline here (a script's own params): nothing to check against
    for name in params.models:
        needed = ["train"] if name == "mlp" else ["featurize", "train"]
        lacking = [f"{kind}_{name}" for kind in needed if f"{kind}_{name}" not in stages]
        if lacking:
            raise ParamsError(
                f"models.{name} is true, but dvc.yaml has no {' or '.join(lacking)} stage: copy "
                "resnet50's stages for it (README, Backbones and fine-tuning), or set it false"
            )


def _parse_models(raw):
    """`models`: model name -> true (in the study) or false. One leaf per model, so that each
    model's stages depend on its own switch alone."""
    if not isinstance(raw, dict) or not raw:
        raise ParamsError(
            f"models: expected a mapping of model name -> true or false (e.g. {{mlp: true, "
            f"vgg16: false}}; on the command line -S models.vgg16=false), got {raw!r}"
        )
    for name, on in raw.items():
        if not isinstance(name, str) or name in COMMON_KEYS:
            raise ParamsError(f"models: {name!r} is not a model name")
        _coerce(bool, on, f"models.{name}")
    if not any(raw.values()):
        raise ParamsError("models: every model is false; set at least one to true")
    return raw


def parse_section(name, raw):
    """One model's section, its `train` already merged (as saved inside a model file)."""
    return _parse(MlpParams if name == "mlp" else BackboneParams, raw, name)


# Keys added since model files were first written, with the value that matches a model saved
# before them (no warm-up, no smoothing, a plain MLP): such a file still loads.
ADDED_KEYS = {"train": {"warmup_epochs": 0, "label_smoothing": 0.0}}
ADDED_MLP_KEYS = {"norm": "none", "residual": False}


def parse_saved_section(name, raw):
    """The section saved in a model file, keys added since then filled in."""
    added = {**ADDED_KEYS, **(ADDED_MLP_KEYS if name == "mlp" else {})}
    return parse_section(name, deep_merge(added, raw) if isinstance(raw, dict) else raw)


def deep_merge(base, overrides):
    """`base` with `overrides` applied key by key, recursively into mappings."""
    if not isinstance(base, dict) or not isinstance(overrides, dict):
        return overrides
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(base.get(key), value) if key in base else value
    return merged


def _parse(cls, raw, where):
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    names = [field.name for field in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ParamsError(f"unknown key '{where}.{key}' (valid: {', '.join(names)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in names:
        if name not in raw:
            raise ParamsError(f"missing key '{where}.{name}'")
        values[name] = _coerce(hints[name], raw[name], f"{where}.{name}")
    return cls(**values)


_KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _coerce(kind, value, key):
    if dataclasses.is_dataclass(kind):
        return _parse(kind, value, key)
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `X | None`, `int | str`
        if value is None and type(None) in args:
            return None
        *others, last = (a for a in args if a is not type(None))
        for option in others:
            with contextlib.suppress(ParamsError):
                return _coerce(option, value, key)
        return _coerce(last, value, key)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if kind is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as the string '1e-4'.
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise ParamsError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ParamsError(f"{key}: expected {_KIND_NAMES[kind]}, got {value!r}")
    return value


def _check(ok, key, value, accepts):
    if not ok:
        raise ParamsError(f"{key} = {value!r}: accepts {accepts}")


def _one_of(key, value, valid):
    _check(value in valid, key, value, "one of " + ", ".join(valid))


def _validate_train(train, where):
    _one_of(f"{where}.optimizer", train.optimizer, tuple(OPTIMIZERS))
    _one_of(f"{where}.scheduler", train.scheduler, SCHEDULERS)
    _one_of(f"{where}.accelerator", train.accelerator, ACCELERATORS)
    _one_of(f"{where}.precision", train.precision, PRECISIONS)
    _one_of(f"{where}.strategy", train.strategy, STRATEGIES)
    _check(train.lr > 0, f"{where}.lr", train.lr, "a number > 0")
    _check(0 <= train.momentum < 1, f"{where}.momentum", train.momentum, "a number in [0, 1)")
    for name in ("weight_decay", "l1", "min_delta"):
        value = getattr(train, name)
        _check(value >= 0, f"{where}.{name}", value, "a number >= 0")
    _check(0 < train.gamma <= 1, f"{where}.gamma", train.gamma, "a number in (0, 1]")
    _check(
        0 <= train.warmup_epochs < train.max_epochs,
        f"{where}.warmup_epochs",
        train.warmup_epochs,
        f"a number >= 0 and below max_epochs ({train.max_epochs})",
    )
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


def _validate(params):
    data = params.data
    _validate_data(data)
    _check(0 <= params.seed <= MAX_SEED, "seed", params.seed, f"an integer from 0 to {MAX_SEED}")
    _check(0 < data.val_fraction < 1, "data.val_fraction", data.val_fraction, "a number in (0, 1)")
    for name in ("train_size", "test_size"):
        value = getattr(data, name)
        _check(value is None or value >= 10, f"data.{name}", value, "null or an integer >= 10")
    for name, section in params.model_sections.items():
        _validate_train(section.train, f"{name}.train")
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
