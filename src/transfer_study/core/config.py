"""params.yaml parsed once into frozen dataclasses; a bad value stops with one line naming it
(what each key accepts: checks.py)."""

import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import yaml

from transfer_study.core.checks import (
    COMMON_KEYS,
    ParamsError,
    check_params,
    check_train,
    coerce,
    parse_fields,
    shown,
)
from transfer_study.core.stage import UserError


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
    # Labeled train images drawn of each class (seeded, nested: 10 lie inside 100); None = all
    per_class: int | None
    batch_size: int
    max_epochs: int
    patience: int  # epochs without val_loss improvement before stopping
    min_delta: float  # smallest val_loss decrease that counts as improvement
    hflip: bool  # random horizontal flips, train split only, for models that see pixels
    crop: int  # pixels of zero padding for random crops, train split only; 0 = off
    accelerator: str
    devices: int  # per node
    num_nodes: int
    # Seconds each process of a distributed run waits for the others to join, at the start (and
    # at any later collective step of training)
    rendezvous_timeout: float
    strategy: str
    precision: str
    compile: bool  # torch.compile the network (measured: docs/performance.md)
    # deterministic algorithms only (CUDA: slower; docs/guarantees-and-tests.md)
    deterministic: bool
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


# The backbones the registry cuts below their top trainable blocks (nn/backbones.py, `stages`).
CUT_BACKBONES = ("lite0", "lite1", "lite2")


def cached_inputs(name, section, crop):
    """What featurize_<name> caches and train_<name> learns from, given the shared train.crop:
    "features" of a frozen backbone; "activations" at the cut below the top trainable_layers
    blocks of a backbone that cuts, when images are not cropped (a crop changes what the frozen
    part sees); None for pixels (the MLP, `all`, crops, backbones that do not cut)."""
    if uses_features(section):
        return "features"
    if (
        name in CUT_BACKBONES
        and isinstance(section, BackboneParams)
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


MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # also names its stages and files
MAX_PARAMS_BYTES = 1 << 20  # 1 MiB: params.yaml is a page of settings, not data


def yaml_problem(error):
    """A YAML parser's error in one line, keeping its position (line and column count from 1);
    also for what the parser lets through: an integer Python will not convert, deep nesting."""
    if isinstance(error, RecursionError):
        return "lists or mappings nested too deep to read"
    if isinstance(error, ValueError):  # Python converts integers of at most 4300 digits
        return "an integer too long to read"
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(problem or error).split()) or type(error).__name__


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    value, while DVC refuses the file, so a stage would run with a value DVC never recorded."""

    def construct_mapping(self, node, deep=False):
        lines = {}  # key -> the line it is first given on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue
            line = key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {shown(key)} given twice, on lines {lines[key]} and {line}",
                    problem_mark=key_node.start_mark,
                )
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_params(path="params.yaml"):
    """params.yaml as YAML read it, not yet validated; unreadable, too large or not YAML: one
    line."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PARAMS_BYTES + 1)
    except OSError as error:
        raise ParamsError(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path} is larger than {MAX_PARAMS_BYTES >> 20} MiB; is it params.yaml?")
    try:
        return yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise ParamsError(f"{path} is not valid YAML: {yaml_problem(error)}") from None


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
                f"unknown key {shown(key)} (valid: {', '.join(COMMON_KEYS)}, or the section of "
                f"a model listed in `models`: {shown(', '.join(switches))}); a misspelt "
                "`dvc exp run -S ++key=...` adds such a key: remove it from params.yaml"
            )
    for name in switches:
        if name not in raw:
            raise ParamsError(f"models lists {shown(name)}, which has no section in params.yaml")
    shared_train = raw["train"]
    # The shared section first, so that its errors name `train.<key>`, not a model's copy.
    train = parse_fields(TrainParams, shared_train, "train")
    check_train(train, "train")
    sections = {}
    for name in switches:
        section = raw[name]
        if not isinstance(section, dict):
            raise ParamsError(f"{name}: expected a mapping, got {shown(section)}")
        # A model's own `train:` overrides the shared section, key by key.
        merged = {**section, "train": deep_merge(shared_train, section.get("train") or {})}
        sections[name] = parse_section(name, merged)
    params = Params(
        seed=coerce(int, raw["seed"], "seed"),
        models=tuple(name for name, on in switches.items() if on),
        data=parse_fields(DataParams, raw["data"], "data"),
        train=train,
        evaluate=parse_fields(EvaluateParams, raw["evaluate"], "evaluate"),
        model_sections=sections,
    )
    check_params(params)
    return params


def pipeline_stages(dvc_yaml):
    """The stage names of dvc.yaml; None where there is no readable pipeline (a script's own
    params, run outside the project)."""
    try:
        stages = yaml.safe_load(Path(dvc_yaml).read_text()).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return set(stages) if isinstance(stages, dict) else None


def check_stages(params, dvc_yaml):
    """Every model in the study has its stages in dvc.yaml: otherwise the pipeline would run to
    evaluate and fail there, for want of a model file DVC never asked for."""
    stages = pipeline_stages(dvc_yaml)
    if stages is None:
        return  # nothing to check against
    for name in params.models:
        needed = ["train"] if name == "mlp" else ["featurize", "train"]
        lacking = [f"{kind}_{name}" for kind in needed if f"{kind}_{name}" not in stages]
        if lacking:
            raise ParamsError(
                f"models.{name} is true, but dvc.yaml has no {' or '.join(lacking)} stage: copy "
                "resnet50's stages for it (docs/pipeline.md, Adding a backbone), or set it false"
            )


def stage_model(argv, params, kind, dvc_yaml="dvc.yaml"):
    """The one argument of the `kind` stage script (train, featurize): a model of params.yaml
    (in the study or left out) whose `<kind>_<model>` stage dvc.yaml has. Anything else (no
    argument, two, a typo, a path) is one line: the name becomes file names under the project."""
    stages = pipeline_stages(dvc_yaml)
    valid = [
        name
        for name in params.model_sections
        if (kind != "featurize" or name != "mlp") and (stages is None or f"{kind}_{name}" in stages)
    ]
    usage = f"python stages/{kind}.py MODEL, MODEL one of: {', '.join(valid)}"
    if len(argv) != 1:
        raise UserError(f"expected one model name: {usage}")
    if argv[0] not in valid:
        raise UserError(f"{shown(argv[0])} is not a model with a {kind} stage: {usage}")
    return argv[0]


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
        coerce(bool, on, f"models.{name}")
    if not any(raw.values()):
        raise ParamsError("models: every model is false; set at least one to true")
    return raw


def parse_section(name, raw):
    """One model's section, its `train` already merged (as saved inside a model file)."""
    return parse_fields(MlpParams if name == "mlp" else BackboneParams, raw, name)


# Keys added since model files were first written, with the value that matches a model saved
# before them (no warm-up, no smoothing, every train image, torch's default process-group timeout
# of 30 minutes, a plain MLP): such a file still loads.
ADDED_KEYS = {
    "train": {
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
        "per_class": None,
        "rendezvous_timeout": 1800.0,
    }
}
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
