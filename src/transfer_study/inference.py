"""Inference, one step a function: read images, run a backbone's frozen part, give logits."""

import numpy as np
import torch
from torch import nn

from transfer_study.core import timing
from transfer_study.data.images import UNREADABLE_IMAGE, read_image
from transfer_study.nn.backbones import cut_below_trainable, feature_extractor
from transfer_study.nn.device import autocast_dtype, default_device

BATCH_SIZE = 256  # images or feature rows per forward pass of predict_logits


def read_images(files, shape):
    """(uint8 N x C x H x W pixels of the readable files, or None when none is; for each file,
    None or why it is unreadable): each read at `shape` (C, H, W), as the model's training
    images were stored (RGB or grayscale, resized), so a photo becomes what it was trained on."""
    images, problems = [], []
    for path in files:
        try:
            images.append(read_image(path, shape))
            problems.append(None)
        except UNREADABLE_IMAGE as error:
            problems.append(str(error) or type(error).__name__)
    return (np.stack(images) if images else None), problems


def frozen_part(name, section, inputs):
    """uint8 images -> what the cache of `inputs` holds: the features of the whole frozen
    backbone ("features"), or its activations at the cut below the trainable blocks."""
    extractor = feature_extractor(name, section.weights, section.image_size)
    if inputs == "activations":
        below, _ = cut_below_trainable(name, extractor[1], section.trainable_layers)
        extractor = nn.Sequential(extractor[0], below)
    return extractor


def prepare_extractor(extractor, device):
    """Eval mode (dropout off, batch norm frozen), no gradients, channels_last on the device."""
    extractor.eval().requires_grad_(False)
    return extractor.to(device, memory_format=torch.channels_last)


@torch.inference_mode()
def frozen_outputs(extractor, images, device, dtype):
    """float16 rows (N x values) of the frozen part's output for a batch of uint8 images on
    `device`, run under autocast to `dtype` (None: float32): what featurize caches."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return extractor(images).flatten(1).to(torch.float16)


@torch.inference_mode()
def predict_logits(net, inputs, device=None, batch_size=BATCH_SIZE):
    """float32 logits (N x classes) for inputs (uint8 images or fp16 features), batched."""
    device = device or default_device()
    net = net.to(device).eval()
    dtype = autocast_dtype(device)
    chunks = []
    timing.work_starts()
    for first in range(0, len(inputs), batch_size):
        batch = torch.as_tensor(inputs[first : first + batch_size]).to(device)
        timing.count_images(len(batch))
        if batch.dtype == torch.float16:
            batch = batch.float()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            chunks.append(net(batch).float().cpu())
    return torch.cat(chunks)
