"""Optimizer and learning-rate schedule registries, built from TrainParams."""

import torch

# name -> (class, extra kwargs taken from TrainParams)
OPTIMIZERS = {
    "adam": (torch.optim.Adam, ()),
    "adamw": (torch.optim.AdamW, ()),
    "sgd": (torch.optim.SGD, ("momentum",)),
    "rmsprop": (torch.optim.RMSprop, ("momentum",)),
    "adagrad": (torch.optim.Adagrad, ()),
    "adadelta": (torch.optim.Adadelta, ()),
}
SCHEDULERS = ("none", "exponential", "cosine")


def build_optimizer(parameters, train):
    """The optimizer named by train.optimizer over `parameters` (trainable ones only)."""
    cls, extra = OPTIMIZERS[train.optimizer]
    kwargs = {name: getattr(train, name) for name in extra}
    return cls(parameters, lr=train.lr, weight_decay=train.weight_decay, **kwargs)


def build_scheduler(optimizer, train):
    """The per-epoch lr schedule named by train.scheduler, or None."""
    if train.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=train.gamma)
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.max_epochs)
    return None
