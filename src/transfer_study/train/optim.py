"""Optimizers, learning-rate schedules and layer-wise lr groups, built from TrainParams."""

import math

import torch

from transfer_study.core.config import OPTIMIZERS, MlpParams, uses_features
from transfer_study.nn.backbones import backbone_spec
from transfer_study.nn.layers import AboveCut


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


def param_groups(name, section, net):
    """Optimizer groups for layer-wise lr decay: the head at lr, each trainable backbone block
    below it at lr * lr_decay**depth (depth 1 = the top block). None: one group at lr."""
    if uses_features(section) or isinstance(section, MlpParams) or section.lr_decay == 1:
        return None
    if isinstance(net, AboveCut):
        _, backbone, head = net
        blocks = backbone.blocks
    else:  # from images: (preprocessing and backbone, head)
        backbone, head = net
        blocks = backbone_spec(name).body_blocks(backbone[1])
    groups = [{"params": trainable_params(head), "lr_scale": 1.0}]
    for depth, block in enumerate(reversed(blocks), start=1):
        if trainable := trainable_params(block):
            groups.append({"params": trainable, "lr_scale": section.lr_decay**depth})
    # Parameters outside the blocks (a ViT's class token) train at the lowest rate.
    grouped = {id(p) for group in groups for p in group["params"]}
    if rest := [p for p in trainable_params(backbone) if id(p) not in grouped]:
        groups.append({"params": rest, "lr_scale": groups[-1]["lr_scale"]})
    return groups


def trainable_params(module):
    return [p for p in module.parameters() if p.requires_grad]
