"""params.yaml parsed once into frozen pydantic dataclasses; a bad value stops with one line that
names its key and what the key accepts."""

import re
from pathlib import Path
from typing import Annotated

from pydantic import PlainValidator, model_validator

from transfer_study.core import paths
from transfer_study.core.catalog import BAD_IMAGES, DATASETS
from transfer_study.core.fields import (
    Factor,
    Flag,
    Fraction,
    Integer,
    NonNegative,
    Number,
    Text,
    Widths,
    at_least,
    checked,
    from_to,
    one_of,
    params_section,
    require,
    validated,
)
from transfer_study.core.params_file import deep_merge, read_params
from transfer_study.core.pipeline import check_stages
from transfer_study.core.stage import ParamsError, shown

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


Count = checked(Integer | None, "null or an integer >= 10", lambda n: n is None or n >= 10)
LearningRate = checked(Number, f"a number > 0, at most {MAX_LR:,.0f}", lambda lr: 0 < lr <= MAX_LR)


@params_section
class DataParams:
    dataset: one_of(DATASETS)
    url: Text  # "official", or where the dataset's files are (see download.download_dataset)
    md5: Text | None  # "official", null (no check), or the digest of a one-file mirror
    path: Text  # folder dataset: the folder of class folders
    image_size: Integer | None  # folder dataset: pixels, square, that images are stored at
    bad_images: one_of(BAD_IMAGES)  # folder dataset: fail or skip bad files
    val_fraction: checked(Number, "a number in (0, 1)", lambda value: 0 < value < 1)
    train_size: Count  # images drawn from the official train set, before the val split
    test_size: Count

    @model_validator(mode="after")
    def _fits_dataset(self):
        one_file = len(DATASETS[self.dataset].files) == 1
        require(
            self.md5 in ("official", None) or (one_file and re.fullmatch("[0-9a-f]{32}", self.md5)),
            "md5",
            self.md5,
            "official, null (no check)" + (" or a 32-digit hex md5" if one_file else ""),
        )
        if self.dataset == "folder":
            size_ok = self.image_size is not None and 8 <= self.image_size <= MAX_IMAGE_SIZE
            require(
                size_ok,
                "image_size",
                self.image_size,
                f"an integer from 8 to {MAX_IMAGE_SIZE}: the size folder images are stored at",
            )
            return self
        # split lists data.path as a dependency: DVC would hash whatever folder it names.
        only_folder = f"for {self.dataset} (only the folder dataset reads data.path)"
        require(
            self.path == DEFAULT_DATA_PATH, "path", self.path, f"{DEFAULT_DATA_PATH} {only_folder}"
        )
        require(
            self.image_size is None,
            "image_size",
            self.image_size,
            f"null for {self.dataset} (its images keep their size; each model resizes its input)",
        )
        return self


@params_section
class TrainParams:
    optimizer: one_of(OPTIMIZERS)
    lr: LearningRate
    momentum: Fraction
    weight_decay: NonNegative
    l1: NonNegative
    scheduler: one_of(SCHEDULERS)
    gamma: Factor
    warmup_epochs: Number  # lr rises linearly from ~0 over these epochs, then follows `scheduler`
    label_smoothing: Fraction  # share of each train target spread over the other classes
    mixup: NonNegative  # alpha of mixup's Beta(alpha, alpha) blend of train batches; 0 = off
    # Labeled train images drawn of each class (seeded, nested: 10 lie inside 100); None = all
    per_class: checked(
        Integer | None,
        "null (every train image) or an integer >= 1: labeled train images of each class",
        lambda n: n is None or n >= 1,
    )
    batch_size: at_least(1)
    max_epochs: at_least(1)
    patience: at_least(0)  # epochs without val_loss improvement before stopping
    min_delta: NonNegative  # smallest val_loss decrease that counts as improvement
    hflip: Flag  # random horizontal flips, train split only, for models that see pixels
    crop: at_least(0)  # pixels of zero padding for random crops, train split only; 0 = off
    accelerator: one_of(ACCELERATORS)
    devices: at_least(1)  # per node
    num_nodes: at_least(1)
    # Seconds each process of a distributed run waits for the others to join, at the start (and
    # at any later collective step of training)
    rendezvous_timeout: checked(
        Number,
        f"a number of seconds > 0 and at most {MAX_RENDEZVOUS_SECONDS:,} (a day)",
        lambda seconds: 0 < seconds <= MAX_RENDEZVOUS_SECONDS,
    )
    strategy: one_of(STRATEGIES)
    precision: one_of(PRECISIONS)
    compile: Flag  # torch.compile the network (measured: docs/performance.md)
    # deterministic algorithms only (CUDA: slower; docs/guarantees-and-tests.md)
    deterministic: Flag
    resume: Flag  # continue an interrupted run of the same configuration from its checkpoint

    @model_validator(mode="after")
    def _warmup_ends_in_time(self):
        # After max_epochs' own check: max_epochs = 0 is reported as itself, not as warm-up's bound.
        require(
            0 <= self.warmup_epochs < self.max_epochs,
            "warmup_epochs",
            self.warmup_epochs,
            f"a number >= 0 and below max_epochs ({self.max_epochs})",
        )
        return self


@params_section
class HeadParams:
    hidden: Widths
    activation: one_of(ACTIVATIONS)
    dropout: Fraction


@params_section
class MlpParams:
    image_size: from_to(MLP_MIN_SIZE, MLP_MAX_SIZE)
    hidden: Widths
    activation: one_of(ACTIVATIONS)
    dropout: Fraction
    norm: one_of(NORMS)  # a normalization layer after each hidden Linear
    residual: Flag  # hidden layers of equal width add their input back (skip connections)
    train: TrainParams

    @model_validator(mode="after")
    def _residual_has_equal_widths(self):
        widths = self.hidden
        require(
            not self.residual or any(a == b for a, b in zip(widths, widths[1:])),
            "residual",
            self.residual,
            f"false with mlp.hidden = {list(widths)}: a skip connection needs two hidden layers "
            "in a row of one width, e.g. [1024, 1024]",
        )
        return self


@params_section
class EvaluateParams:
    hflip: Flag  # average each test prediction over the image and its mirror image


def _trainable_layers(layers):
    ok = layers == "all" or (type(layers) is int and layers >= 0)  # a bool is no count
    require(ok, "", layers, "an integer >= 0 (0 = frozen backbone, cached features) or all")
    return layers


@params_section
class BackboneParams:
    weights: checked(  # imagenet | none | path to a torchvision state_dict
        Text,
        "imagenet, none or the path of an existing state_dict file",
        lambda weights: weights in ("imagenet", "none") or paths.user_path(weights).is_file(),
    )
    # The smallest size is the registry's, checked where the backbone is built (nn/backbones.py).
    image_size: checked(
        Integer, f"an integer up to {MAX_IMAGE_SIZE}", lambda n: n <= MAX_IMAGE_SIZE
    )
    # Blocks of the backbone trained, counted from its top: 0 trains a head on cached features;
    # N > 0 or "all" fine-tune from images.
    trainable_layers: Annotated[int | str, PlainValidator(_trainable_layers)]
    lr_decay: Factor  # lr factor per block going down from the head (layer-wise decay)
    # Fine-tuning (trainable_layers above 0, or all): epochs the new head first trains alone on
    # the frozen backbone's features, before any block unfreezes; 0 = none. Frozen: unused.
    head_epochs: at_least(0)
    head_lr: LearningRate
    # The frozen pass's autocast in featurize: auto (bf16 on a CPU only where a probe finds it
    # faster), or bf16 or fp32 pinned, for a cache that is the same on every machine
    featurize_precision: one_of(("auto", "bf16", "fp32"))
    head: HeadParams
    train: TrainParams


@params_section
class Params:
    seed: from_to(0, MAX_SEED)
    models: tuple[str, ...]  # the models in the study (`models: {name: true}`), in report order
    data: DataParams
    train: TrainParams
    evaluate: EvaluateParams
    # every model of `models`, in or out -> MlpParams | BackboneParams
    model_sections: dict[str, MlpParams | BackboneParams]

    def model(self, name):
        return self.model_sections[name]

    @model_validator(mode="after")
    def _crops_only_pixels(self):
        # Only for models in the study, so that a shared train.crop can still be set while
        # frozen backbones sit out.
        for name in self.models:
            section = self.model_sections[name]
            require(
                not uses_features(section) or section.train.crop == 0,
                f"{name}.train.crop",
                section.train.crop,
                f"0 while {name}.trainable_layers is 0: cached features cannot be cropped (crop "
                f"only the models that see pixels, e.g. mlp.train.crop, or fine-tune {name})",
            )
        return self


def uses_features(section):
    """Frozen backbones train a head on cached features; everything else sees pixels."""
    return isinstance(section, BackboneParams) and section.trainable_layers == 0


MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # also names its stages and files


def load_params(path="params.yaml", overrides=None):
    """Parse and validate params.yaml (with optional nested `overrides`) into Params, and check
    that dvc.yaml has the stages of every model in the study."""
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
                f"unknown key {shown(key)} (valid: {', '.join(COMMON_KEYS)}, or the section of "
                f"a model listed in `models`: {shown(', '.join(switches))}); a misspelt "
                "`dvc exp run -S ++key=...` adds such a key: remove it from params.yaml"
            )
    for name in switches:
        if name not in raw:
            raise ParamsError(f"models lists {shown(name)}, which has no section in params.yaml")
    shared_train = raw["train"]
    # The shared section first, so that its errors name `train.<key>`, not a model's copy.
    train = validated(TrainParams, shared_train, "train")
    sections = {}
    for name in switches:
        section = raw[name]
        if not isinstance(section, dict):
            raise ParamsError(f"{name}: expected a mapping, got {shown(section)}")
        # A model's own `train:` overrides the shared section, key by key.
        merged = {**section, "train": deep_merge(shared_train, section.get("train") or {})}
        sections[name] = parse_section(name, merged)
    fields = {key: raw[key] for key in ("seed", "data", "evaluate")}
    in_study = tuple(name for name, on in switches.items() if on)
    return validated(
        Params, {**fields, "models": in_study, "train": train, "model_sections": sections}, ""
    )


def _parse_models(raw):
    """`models`: model name -> true (in the study) or false. One leaf per model, so that each
    model's stages depend on its own switch alone."""
    if not isinstance(raw, dict) or not raw:
        raise ParamsError(
            f"models: expected a mapping of model name -> true or false (e.g. {{mlp: true, "
            f"vgg16: false}}; on the command line -S models.vgg16=false), got {shown(raw)}"
        )
    for name, on in raw.items():
        if not isinstance(name, str) or name in COMMON_KEYS or not MODEL_NAME.fullmatch(name):
            raise ParamsError(
                f"models: {shown(name)} is not a model name (lowercase letters, digits and _, "
                "at most 64 characters, as torchvision's names)"
            )
        if not isinstance(on, bool):
            raise ParamsError(f"models.{name}: expected true or false, got {shown(on)}")
    if not any(raw.values()):
        raise ParamsError("models: every model is false; set at least one to true")
    return raw


def parse_section(name, raw):
    """One model's section, its `train` already merged (as saved inside a model file)."""
    return validated(MlpParams if name == "mlp" else BackboneParams, raw, name)
