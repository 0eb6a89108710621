"""The head trained first: before any block of a fine-tuned backbone unfreezes, its new head
learns alone on the frozen backbone's features for <model>.head_epochs epochs, so that a random
head's large gradients do not damage the pretrained blocks (fastai's fine_tune, Keras' guide)."""

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from transfer_study.train.loaders import training_device
from transfer_study.train.optim import build_optimizer

BATCH_SIZE = 256  # images or cached rows per pass of the frozen network below the head


def trains_head_first(section):
    """Whether model `section` fine-tunes blocks and asks for its head to be trained first."""
    return getattr(section, "head_epochs", 0) > 0 and section.trainable_layers != 0


def train_head_first(name, net, inputs, train, epochs, lr, seed):
    """Train `net`'s head (its last module) alone for `epochs` epochs at `lr` (train's optimizer,
    weight decay and label smoothing; no schedule, no mixup) on what the rest of `net` gives the
    train inputs in eval mode (batch norms on their running statistics, no dropout): one pass
    below the head, then seconds an epoch. The rest of `net` is left as it was.
    Returns the seconds it took."""
    started = time.perf_counter()
    device = training_device(train)
    below, head = net[:-1].to(device).eval(), net[-1].to(device)
    with torch.no_grad():  # float32, as the head trains: no autocast
        features = torch.cat(
            [
                below(_batch(inputs.train[0], first, device)).flatten(1)
                for first in range(0, len(inputs.train[1]), BATCH_SIZE)
            ]
        )
    labels = torch.as_tensor(inputs.train[1], device=device)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, dataclasses.replace(train, lr=lr))
    order = torch.Generator().manual_seed(seed)  # the draw of the batches, apart from training's
    head.train()
    for epoch in range(1, epochs + 1):
        total = 0.0
        for rows in torch.randperm(len(labels), generator=order).split(inputs.batch_size):
            rows = rows.to(device)
            logits = head(features[rows])
            loss = F.cross_entropy(logits, labels[rows], label_smoothing=train.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        seconds = time.perf_counter() - started
        print(
            f"{name}: head first, epoch {epoch}/{epochs}: train/loss {total / len(labels):.4f} "
            f"({seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return time.perf_counter() - started


def _batch(inputs, first, device):
    """Rows `first`.. of the train inputs on `device`: uint8 images, or fp16 cached activations
    as float32 (the network's dtype)."""
    batch = torch.as_tensor(inputs[first : first + BATCH_SIZE]).to(device)
    return batch.float() if batch.dtype == torch.float16 else batch
