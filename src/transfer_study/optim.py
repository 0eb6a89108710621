"""Optimizers and learning-rate schedules, built from TrainParams (names: params.OPTIMIZERS)."""

import math

import torch

from .params import OPTIMIZERS


def optimizer_class(name):
    """The torch.optim class params.yaml calls `name`."""
    return getattr(torch.optim, OPTIMIZERS[name][0])


def build_optimizer(parameters, train):
    """The optimizer named by train.optimizer over `parameters` (trainable ones only)."""
    extra = OPTIMIZERS[train.optimizer][1]
    kwargs = {name: getattr(train, name) for name in extra}
    return optimizer_class(train.optimizer)(
        parameters, lr=train.lr, weight_decay=train.weight_decay, **kwargs
    )


def lr_factor(train, step, steps_per_epoch):
    """The lr multiplier at optimizer step `step` (0-based): a linear warm-up over
    train.warmup_epochs (whole steps), then train.scheduler from the end of the warm-up: none
    (1), exponential (gamma per whole epoch) or cosine (down to 0 at the end of max_epochs)."""
    warmup_steps = math.ceil(train.warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    after = step - warmup_steps  # steps since the warm-up ended
    if train.scheduler == "exponential":
        return train.gamma ** (after // steps_per_epoch)
    if train.scheduler == "cosine":
        remaining = max(1, train.max_epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, after / remaining)))
    return 1.0


def scheduled(train):
    """Whether the lr changes during training (a scheduler or a warm-up)."""
    return train.scheduler != "none" or train.warmup_epochs > 0


def build_scheduler(optimizer, train, steps_per_epoch):
    """The lr schedule of train.scheduler and train.warmup_epochs, stepped after every optimizer
    step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(train, step, steps_per_epoch)
    )
