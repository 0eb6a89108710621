"""A finished training's outputs: the model file (best epoch's weights), history and metrics."""

import dataclasses
import io

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision

from transfer_study.core import paths
from transfer_study.core.atomic import atomic_paths, json_text
from transfer_study.core.stage import UserError
from transfer_study.nn.backbones import UnreadableTensors, count_params, load_tensors
from transfer_study.train.history import kept_epoch, logged_history
from transfer_study.train.trainer import resolve_precision


def finished_history(name, checkpoints):
    """The run's epoch history, refused when no epoch has a finite val loss to keep."""
    history = logged_history(checkpoints)
    if not np.isfinite(history["val_loss"]).any():  # inf too: no epoch to keep
        raise UserError(f"{name}: val_loss was never finite; lower {name}.train.lr")
    return history


def restore_best(module, name, best_path):
    """Load the best checkpoint's weights into `module`."""
    try:
        state = load_tensors(best_path)
    except UnreadableTensors as error:
        raise UserError(f"{name}: its best checkpoint {best_path}: {error}") from None
    module.load_state_dict(state["state_dict"])


def model_config(name, section, seed, inputs):
    """What the model file records beside the weights, to rebuild and describe the network."""
    return {
        "name": name,
        "section": dataclasses.asdict(section),
        "classes": list(inputs.classes),
        "data": inputs.stats,
        "feature_dim": inputs.feature_dim,
        "inputs": inputs.cached,
        "activation_shape": inputs.activation_shape,
        "seed": seed,
    }


def training_metrics(train, inputs, net, history, seconds, resumed, device):
    """train_<model>'s metrics: the kept epoch's, the run's size and cost, and its set-up."""
    kept = kept_epoch(history)
    return {
        "kept_val_loss": float(kept["val_loss"]),
        "kept_val_accuracy": float(kept["val_acc"]),
        "kept_epoch": int(kept["epoch"]),
        "epochs": len(history),
        "train_seconds": round(seconds, 2),
        "resumed": resumed,
        "trainable_params": count_params(net, trainable_only=True),
        "total_params": count_params(net) + inputs.cache_meta.get("backbone_params", 0),
        "lr": train.lr,
        "optimizer": train.optimizer,
        "batch_size": inputs.batch_size,
        "train_images": inputs.labeled,  # labeled: train.per_class of each class, or the split
        "per_class": train.per_class,
        "precision": resolve_precision(train),
        "device": device,
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "lightning": pl.__version__,
        },
    }


def write_outputs(name, net, config, history, metrics):
    """Model, history and metrics as one set: every file is written before any is renamed into
    place. torch.save goes through memory first: writing to a full disk then raises an OSError
    (one line), not the C++ stream error torch.save to a file would."""
    model_bytes = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "config": config}, model_bytes)
    outputs = (paths.model_file(name), paths.history_file(name), paths.train_metrics(name))
    with atomic_paths(*outputs) as (model_tmp, history_tmp, metrics_tmp):
        model_tmp.write_bytes(model_bytes.getvalue())
        history.to_csv(history_tmp, index=False)
        metrics_tmp.write_text(json_text(metrics))
