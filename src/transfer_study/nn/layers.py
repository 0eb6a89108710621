"""Network pieces shared by every model: activations, the MLP/head builder, input preprocessing."""

import torch
import torch.nn.functional as F
from torch import nn

from transfer_study.core.config import ACTIVATIONS, NORMS


def activation_layer(name):
    """A new instance of the activation params.yaml calls `name`."""
    return getattr(nn, ACTIVATIONS[name])()


def frozen_modules(net):
    """The modules of `net` with parameters, every one of them frozen: in training they stay in
    eval mode, so that they compute what they were trained to (batch norms keep ImageNet's
    statistics, Lite blocks drop no connection) and give an image the same output in every
    epoch, the activations featurize caches below a cut."""
    return [
        m
        for m in net.modules()
        if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())
    ]


class AboveCut(nn.Sequential):
    """(unflatten, the backbone's stages above a cut, head): a network that learns from the
    activations cached at the cut, flattened one row an image."""


class Residual(nn.Sequential):
    """Layers whose output is added to their input (same width): a skip connection."""

    def forward(self, inputs):
        return inputs + super().forward(inputs)


def mlp(in_features, hidden, num_classes, activation, dropout, norm="none", residual=False):
    """Linear layers of widths `hidden`, each followed by the `norm` layer, the activation and
    dropout, then the logits. With `residual`, a hidden layer as wide as its input adds it back.
    No hidden layer: a linear classifier (a linear probe, on a backbone's features)."""
    layers = []
    for width in hidden:
        block = [nn.Linear(in_features, width)]
        if NORMS[norm]:
            block.append(getattr(nn, NORMS[norm])(width))
        block.append(activation_layer(activation))
        if dropout > 0:
            block.append(nn.Dropout(dropout))
        layers += [Residual(*block)] if residual and width == in_features else block
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class Preprocess(nn.Module):
    """uint8 NCHW images -> float, resized to `size` and normalized, all as one batched op."""

    def __init__(self, size, mean, std):
        super().__init__()
        self.size = size
        # mean/std are given on the 0-1 scale; scaling them by 255 saves a division per pixel.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, images):
        x = images.float()
        if x.shape[1] == 1 and self.mean.shape[1] == 3:  # grayscale into an RGB network
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            # Antialias only matters when shrinking; it is a no-op cost when enlarging.
            shrinking = x.shape[-1] > self.size
            x = F.interpolate(
                x,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=shrinking,
            )
        return (x - self.mean) / self.std


def augment(images, hflip, crop):
    """Train-time augmentation of a uint8 NCHW batch, on its device: random left-right flips
    (`hflip`), and random crops of the image zero-padded by `crop` pixels on each side."""
    n, channels, height, width = images.shape
    device = images.device
    if hflip:
        flip = torch.rand(n, device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if crop:
        padded = F.pad(images, (crop, crop, crop, crop))
        top, left = torch.randint(0, 2 * crop + 1, (2, n, 1), device=device)
        rows = top + torch.arange(height, device=device)  # n x height
        cols = left + torch.arange(width, device=device)  # n x width
        images = padded[
            torch.arange(n, device=device)[:, None, None, None],
            torch.arange(channels, device=device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    return images
