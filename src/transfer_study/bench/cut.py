"""An epoch of partial fine-tuning from cached activations against one from images.

python -m transfer_study.bench cut [--model lite0] [--trainable-layers 3] [--image-size 224]
    [--images 512] [--archive cifar.tar.gz]

The same images, the same trainable blocks and head, one process: from images, every batch
runs the frozen part too (as training from pixels does); from activations, the frozen part ran
once, before the epoch (featurize's job, timed apart). The last line is JSON with the ratio.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transfer_study.core.stage import UserError, exit_on_user_error
from transfer_study.featurize import prepare_extractor
from transfer_study.nn.backbones import (
    backbone_spec,
    cut_below_trainable,
    feature_extractor,
    set_trainable_layers,
)
from transfer_study.nn.layers import mlp
from transfer_study.split import read_cifar10

BATCH = 32  # images per optimizer step, params.yaml's train.batch_size
HEAD = ((128, 64), 10, "leaky_relu", 0.3)  # params.yaml's default head, 10 classes


def arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m transfer_study.bench cut", description=__doc__)
    parser.add_argument("--model", default="lite0", help="a backbone that cuts (lite0/1/2)")
    parser.add_argument("--trainable-layers", type=int, default=3, help="blocks trained")
    parser.add_argument("--image-size", type=int, default=224, help="pixels (default 224)")
    parser.add_argument("--images", type=int, default=512, help="images in the epoch")
    parser.add_argument("--archive", help="CIFAR-10 python archive (default: random images)")
    return parser.parse_args(argv)


def _images(archive, count):
    if archive is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, count)
    train, _ = read_cifar10(archive)
    return train.images[:count], train.labels[:count]


def _epoch(network, inputs, labels):
    """Seconds of one epoch of Adam steps on `network` (its trainable parameters)."""
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    start = time.perf_counter()
    for first in range(0, len(inputs), BATCH):
        batch = torch.as_tensor(inputs[first : first + BATCH])
        loss = F.cross_entropy(
            network(batch).float(), torch.as_tensor(labels[first : first + BATCH])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


@exit_on_user_error
def main(argv):
    args = arguments(argv)
    name, layers = args.model, args.trainable_layers
    if backbone_spec(name).stages is None:
        raise UserError(f"--model {name}: not a backbone that cuts (lite0, lite1, lite2)")
    torch.manual_seed(0)
    images, labels = _images(args.archive, args.images)
    extractor = feature_extractor(name, "imagenet", args.image_size)
    set_trainable_layers(name, extractor[1], layers)
    below, above = cut_below_trainable(name, extractor[1], layers)
    head = mlp(backbone_spec(name).feature_dim, *HEAD)
    frozen = prepare_extractor(nn.Sequential(extractor[0], below), torch.device("cpu"))
    start = time.perf_counter()
    with torch.inference_mode():  # what featurize caches, once
        activations = torch.cat(
            [frozen(torch.as_tensor(images[i : i + BATCH])) for i in range(0, len(images), BATCH)]
        )
    cache_seconds = time.perf_counter() - start
    activations = activations.to(torch.float16)
    above.train()
    from_activations = _epoch(nn.Sequential(above, head), activations.float().numpy(), labels)
    from_images = _epoch(nn.Sequential(frozen, above, head), images, labels)
    result = {
        "model": name,
        "trainable_layers": layers,
        "image_size": args.image_size,
        "images": len(images),
        "activation_shape": list(activations.shape[1:]),
        "cache_seconds": round(cache_seconds, 2),
        "epoch_seconds_from_images": round(from_images, 2),
        "epoch_seconds_from_activations": round(from_activations, 2),
        "epoch_ratio": round(from_images / from_activations, 1),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result
