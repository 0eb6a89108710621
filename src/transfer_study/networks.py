"""Networks by model section: built to train, or rebuilt from a trained model file."""

import numpy as np
import torch
from torch import nn

from . import layout
from .data import channel_stats, load_split
from .models import backbone_spec, feature_extractor, set_trainable_layers
from .nets import Preprocess, mlp
from .params import MlpParams, parse_section, uses_features


def build_net(name, section, num_classes, data_stats, feature_dim=None, weights=None):
    """The trainable network for a model section. `data_stats` ({"shape": [C, H, W], "mean",
    "std"} of the train images) sizes and normalizes the MLP's input. `weights` overrides
    section.weights (loading a trained model needs no ImageNet download: its state_dict replaces
    them)."""
    if isinstance(section, MlpParams):
        size = section.image_size
        channels = data_stats["shape"][0]
        return nn.Sequential(
            Preprocess(size, data_stats["mean"], data_stats["std"]),
            nn.Flatten(),
            mlp(channels * size * size, *_layers(section, num_classes)),
        )
    if uses_features(section):
        return mlp(feature_dim, *_layers(section.head, num_classes))
    extractor = feature_extractor(name, weights or section.weights, section.image_size)
    set_trainable_layers(name, extractor[1], section.trainable_layers)
    head = mlp(backbone_spec(name).feature_dim, *_layers(section.head, num_classes))
    return nn.Sequential(extractor, head)


def _layers(section, num_classes):
    return section.hidden, num_classes, section.activation, section.dropout


def data_stats(train_images):
    """What the MLP needs to know of its input, saved with the model: shape and channel stats."""
    mean, std = channel_stats(train_images)
    return {"shape": list(train_images.shape[1:]), "mean": mean, "std": std}


def load_inputs(name, section, split):
    """(inputs as the model `name` consumes them, the split itself) of a split."""
    data = load_split(layout.split_file(split))
    if uses_features(section):
        return np.load(layout.features_file(name, split)), data
    return data.images, data


def load_trained(path):
    """(network in eval mode, its model section, config) from a file written by train_model."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = saved["config"]
    section = parse_section(config["name"], config["section"])
    net = build_net(
        config["name"],
        section,
        len(config["classes"]),
        config["data"],
        config["feature_dim"],
        weights="none",
    )
    net.load_state_dict(saved["state_dict"])
    return net.eval(), section, config
