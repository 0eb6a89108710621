"""Optimizers and learning-rate schedules, built from TrainParams (names: params.OPTIMIZERS)."""

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


def build_scheduler(optimizer, train):
    """The per-epoch lr schedule named by train.scheduler, or None."""
    if train.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=train.gamma)
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.max_epochs)
    return None
