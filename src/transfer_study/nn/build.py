"""Networks by model section: built to train, or rebuilt from a trained model file."""

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transfer_study.core import paths
from transfer_study.core.config import MlpParams, parse_section, uses_features
from transfer_study.core.markers import is_skipped
from transfer_study.core.params_file import deep_merge
from transfer_study.core.stage import UserError, shown
from transfer_study.data.splits import channel_stats, load_split, read_array_file, require_file
from transfer_study.nn.backbones import (
    UnreadableTensors,
    backbone_spec,
    cut_below_trainable,
    feature_extractor,
    load_tensors,
    set_trainable_layers,
)
from transfer_study.nn.layers import AboveCut, Preprocess, mlp

MAX_IMAGE_SIDE = 4096  # pixels; far above the size any dataset here is stored at
# Training holds each parameter four times in float32: the weight, its gradient and Adam's two
# moments (activations come on top).
TRAINING_BYTES_PER_PARAM = 4 * 4
FINITE_CHECK_ROWS = 4096  # cache rows checked for NaN at a time


def build_net(
    name, section, num_classes, stats, feature_dim=None, weights=None, activation_shape=None
):
    """The trainable network for a model section. `stats` ({"shape": [C, H, W], "mean",
    "std"} of the train images) sizes and normalizes the MLP's input. `weights` overrides
    section.weights (loading a trained model needs no ImageNet download: its state_dict replaces
    them). With `activation_shape` (of one image's cached activations at the cut), the backbone
    above the cut and the head, learning from those activations."""
    if isinstance(section, MlpParams):
        size = section.image_size
        channels = stats["shape"][0]
        return nn.Sequential(
            Preprocess(size, stats["mean"], stats["std"]),
            nn.Flatten(),
            mlp(
                channels * size * size,
                *_layers(section, num_classes),
                norm=section.norm,
                residual=section.residual,
            ),
        )
    if uses_features(section):
        return mlp(feature_dim, *_layers(section.head, num_classes))
    extractor = feature_extractor(name, weights or section.weights, section.image_size)
    set_trainable_layers(name, extractor[1], section.trainable_layers)
    head = mlp(backbone_spec(name).feature_dim, *_layers(section.head, num_classes))
    if activation_shape is not None:
        _, above = cut_below_trainable(name, extractor[1], section.trainable_layers)
        return AboveCut(nn.Unflatten(1, tuple(activation_shape)), above, head)
    return nn.Sequential(extractor, head)


def check_trainable(name, section, num_classes, stats, feature_dim, memory_bytes):
    """Refuse, before allocating anything, a network whose training state alone would not fit
    in `memory_bytes` (the memory of the device it trains on), naming the key that sizes it."""
    with torch.device("meta"):  # shapes only: a 10^8-unit layer costs nothing here
        net = build_net(name, section, num_classes, stats, feature_dim, weights="none")
    # With the whole backbone: what training from images holds, more than from activations.
    count = sum(p.numel() for p in net.parameters())
    needed = count * TRAINING_BYTES_PER_PARAM
    if needed > memory_bytes:
        hidden = section.hidden if isinstance(section, MlpParams) else section.head.hidden
        key = "mlp.hidden" if isinstance(section, MlpParams) else f"{name}.head.hidden"
        raise UserError(
            f"{key} = {shown(list(hidden))}: a network of {count:,} parameters needs "
            f"{needed / 2**30:,.1f} GiB to train (weights, gradients, optimizer state), more "
            f"than the {memory_bytes / 2**30:,.1f} GiB of memory it would train in; use fewer "
            "or narrower layers"
        )


def _layers(section, num_classes):
    return section.hidden, num_classes, section.activation, section.dropout


def data_stats(train_images):
    """What the MLP needs to know of its input, saved with the model: shape and channel stats."""
    mean, std = channel_stats(train_images)
    return {"shape": list(train_images.shape[1:]), "mean": mean, "std": std}


def read_cache_meta(name):
    """The meta.json featurize_<name> wrote beside its cache, checked for the keys training and
    evaluation read; missing, damaged or another file (a left-out model's marker), one line
    naming it and the stage to rerun."""
    path, stage = paths.features_meta(name), f"featurize_{name}"
    require_file(path, stage)
    try:
        meta = json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        meta = None
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if not (
        isinstance(shape, list)
        and all(isinstance(n, int) and n >= 1 for n in shape)
        and meta.get("feature_dim") == math.prod(shape)
        and isinstance(meta.get("backbone_params"), int)
    ):
        raise UserError(
            f"{path} does not hold the description {stage} writes (a mapping with feature_dim, "
            f"shape and backbone_params); rerun {stage} (dvc repro {stage})"
        )
    return meta


def read_cache(name, cached, rows):
    """The float16 rows x feature_dim features or activations featurize_<name> cached as
    `cached` (a split, or its mirrored images'), for `rows` images. Checked against meta.json
    and the split, and for NaN and infinity: a cache of another run or a damaged one would
    otherwise fail deep in training with a traceback, or train and score on NaN."""
    stage = f"featurize_{name}"
    width = read_cache_meta(name)["feature_dim"]
    path = paths.features_file(name, cached)
    array = read_array_file(path, stage)
    if array.dtype != np.float16 or array.shape != (rows, width):
        raise UserError(
            f"{path} holds {array.dtype} values of shape {shown(array.shape)}, not float16 of "
            f"shape ({rows}, {width}) (the split's images, meta.json's feature_dim); rerun "
            f"{stage} (dvc repro {stage})"
        )
    # In chunks: a whole-array test would take a bool copy the size of half the cache.
    chunks = range(0, rows, FINITE_CHECK_ROWS)
    if not all(np.isfinite(array[i : i + FINITE_CHECK_ROWS]).all() for i in chunks):
        raise UserError(f"{path} holds NaN or infinite values; rerun {stage} (dvc repro {stage})")
    return array


def load_inputs(name, inputs, split):
    """(inputs as the model `name` consumes them, the split itself) of a split: its cached
    `inputs` ("features" or "activations", backbones.cached_inputs), or None for its images."""
    data = load_split(paths.split_file(split))
    if inputs is not None:
        return read_cache(name, split, len(data.labels)), data
    return data.images, data


def saved_inputs(section, config):
    """What a trained model learned from: its config's record (model files written before
    partial fine-tuning read activations have none: features for a frozen backbone)."""
    return config.get("inputs", "features" if uses_features(section) else None)


# Keys added since model files were first written, with the value that matches a model saved
# before them (no warm-up, no smoothing, every train image, torch's default process-group timeout
# of 30 minutes, no mixup, a plain MLP): such a file still loads.
ADDED_KEYS = {
    "train": {
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
        "per_class": None,
        "rendezvous_timeout": 1800.0,
        "mixup": 0.0,
    }
}
ADDED_MLP_KEYS = {"norm": "none", "residual": False}
ADDED_BACKBONE_KEYS = {"head_epochs": 0, "head_lr": 1e-3, "featurize_precision": "auto"}


def _saved_section(name, raw):
    """The section saved in a model file, keys added since then filled in."""
    added = {**ADDED_KEYS, **(ADDED_MLP_KEYS if name == "mlp" else ADDED_BACKBONE_KEYS)}
    return parse_section(name, deep_merge(added, raw) if isinstance(raw, dict) else raw)


def load_trained(path):
    """(network in eval mode, its model section, config) from a file written by train_model.

    Only tensors and plain containers are unpickled (weights_only), so a tampered file runs
    nothing; a file that is not such a model, whole, stops with one line naming the remedy.
    """
    path = Path(path)
    name = path.stem
    remedy = f"restore it with `dvc checkout {path}` or rebuild it with `dvc repro train_{name}`"
    if not path.is_file():
        raise UserError(f"{path} does not exist: train it first (dvc repro train_{name})")
    if is_skipped(path):
        raise UserError(f"{name} was left out of `models` in the last run: {path} is no model")
    try:
        saved = load_tensors(path)
    except UnreadableTensors as why:
        raise UserError(
            f"{path} is not a model file this project wrote ({why}); {remedy}"
        ) from None
    try:
        return _rebuild(saved, name)
    except (
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        AttributeError,
        RuntimeError,
        UserError,
    ) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{path} does not hold a model this project can rebuild ({first}); {remedy}"
        ) from None


def _rebuild(saved, name):
    config, state = saved["config"], saved["state_dict"]
    if config["name"] != name:
        raise ValueError(f"it holds model {config['name']!r}, not {name!r}")
    stats = config["data"]
    channels, height, width = stats["shape"]
    # predict reads images at this shape: a tampered 100,000-pixel side would exhaust memory.
    sides_ok = all(1 <= side <= MAX_IMAGE_SIDE for side in (height, width))
    if not (
        channels in (1, 3) and sides_ok and len(stats["mean"]) == len(stats["std"]) == channels
    ):
        raise ValueError("its input shape or statistics are not those of stored images")
    section = _saved_section(config["name"], config["section"])
    args = (config["name"], section, len(config["classes"]), config["data"], config["feature_dim"])
    cut = {}
    if saved_inputs(section, config) == "activations":
        shape = config["activation_shape"]
        if not (len(shape) == 3 and all(isinstance(n, int) and 1 <= n <= 1 << 16 for n in shape)):
            raise ValueError("its activation shape is not one a cut gives")
        cut = {"activation_shape": shape}
    # Shapes first, on the meta device (nothing allocated): a file whose config asks for a huge
    # network is refused before it costs memory.
    with torch.device("meta"):
        expected = {
            k: tuple(v.shape)
            for k, v in build_net(*args, weights="none", **cut).state_dict().items()
        }
    found = {k: tuple(v.shape) if torch.is_tensor(v) else None for k, v in state.items()}
    if found != expected:
        raise ValueError("its weights do not fit the network its config describes")
    net = build_net(*args, weights="none", **cut)
    net.load_state_dict(state)
    return net.eval(), section, config
