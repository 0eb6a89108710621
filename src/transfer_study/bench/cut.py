"""An epoch of partial fine-tuning from cached activations against one from images.

python -m transfer_study.bench cut [--model lite0] [--trainable-layers 3] [--image-size 224]
    [--images 512] [--archive cifar.tar.gz [--epochs 5 --test-images 1000 --seeds 3]]

The same images, the same trainable blocks and head, one process: from images, every batch
runs the frozen part too (as training from pixels does); from activations, the frozen part ran
once, before the epoch (featurize's job, timed apart). With --epochs, both paths train that
many epochs from the same start, with the same batches and the same random flips (mirrored
images, or their cached activations), and are scored on the archive's test images; --seeds K
repeats that with K draws of batches, flips and dropout, to show how far two runs of one path
fall apart. The last line is JSON with the ratio (and both accuracies, means over the seeds).
"""

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transfer_study.bench.arguments import at_least
from transfer_study.core.stage import UserError, exit_on_user_error
from transfer_study.data.readers import read_cifar10
from transfer_study.inference import prepare_extractor
from transfer_study.nn.backbones import (
    backbone_spec,
    cut_below_trainable,
    feature_extractor,
    set_trainable_layers,
)
from transfer_study.nn.layers import frozen_modules, mlp

BATCH = 32  # images per optimizer step, params.yaml's train.batch_size
HEAD = ((128, 64), 10, "leaky_relu", 0.3)  # params.yaml's default head, 10 classes


def arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m transfer_study.bench cut", description=__doc__)
    parser.add_argument("--model", default="lite0", help="a backbone that cuts (lite0/1/2)")
    parser.add_argument("--trainable-layers", type=at_least(1), default=3, help="blocks trained")
    parser.add_argument("--image-size", type=int, default=224, help="pixels (default 224)")
    parser.add_argument("--images", type=at_least(1), default=512, help="train images")
    parser.add_argument("--archive", help="CIFAR-10 python archive (default: random images)")
    parser.add_argument(
        "--epochs", type=at_least(0), default=0, help="train both paths and score them"
    )
    parser.add_argument(
        "--test-images", type=at_least(1), default=1000, help="scored, with --epochs"
    )
    parser.add_argument(
        "--seeds", type=at_least(1), default=1, help="draws of batches, flips, dropout"
    )
    args = parser.parse_args(argv)
    if args.epochs and not args.archive:
        parser.error("--epochs needs --archive (its test images are scored)")
    return args


def _images(archive, count, test_count):
    """uint8 (train images, labels, test images, labels): the archive's, or random ones."""
    if archive is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        return images, rng.integers(0, 10, count), images[:0], np.zeros(0, np.int64)
    train, test = read_cifar10(archive)
    return (
        train.images[:count],
        train.labels[:count],
        test.images[:test_count],
        test.labels[:test_count],
    )


def _run(module, inputs):
    return torch.cat([module(inputs[i : i + BATCH]) for i in range(0, len(inputs), BATCH)])


def _train_mode(network):
    """Train mode, as the training module sets it: frozen modules stay in eval mode."""
    network.train()
    for module in frozen_modules(network):
        module.eval()


def _epoch(network, optimizer, plain, mirrored, labels, epoch, seed):
    """Seconds of one epoch of optimizer steps: batch b of epoch e holds the same images, each
    mirrored or not, whatever the inputs are (images or their cached activations)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(labels), generator=generator)
    flips = torch.rand(len(labels), generator=generator) < 0.5
    _train_mode(network)
    start = time.perf_counter()
    for first in range(0, len(labels), BATCH):
        chosen = order[first : first + BATCH]
        flip = flips[chosen].view(-1, *([1] * (plain.dim() - 1)))
        batch = torch.where(flip, mirrored[chosen], plain[chosen])
        loss = F.cross_entropy(network(batch).float(), labels[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def _train(network, plain, mirrored, labels, epochs, seed):
    """Seconds of each epoch of Adam steps on the trainable parameters (one epoch at least)."""
    torch.manual_seed(seed)  # dropout draws the same in both paths
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    epochs = range(max(epochs, 1))
    return [_epoch(network, optimizer, plain, mirrored, labels, e, seed) for e in epochs]


@torch.inference_mode()
def _accuracy(network, inputs, labels):
    network.eval()
    predicted = _run(network, inputs).argmax(1)
    return round(float((predicted == torch.as_tensor(labels)).float().mean()), 4)


@exit_on_user_error
def main(argv):
    args = arguments(argv)
    name, layers = args.model, args.trainable_layers
    if backbone_spec(name).stages is None:
        raise UserError(f"--model {name}: not a backbone that cuts (lite0, lite1, lite2)")
    torch.manual_seed(0)
    images, labels, test_images, test_labels = _images(args.archive, args.images, args.test_images)
    extractor = feature_extractor(name, "imagenet", args.image_size)
    set_trainable_layers(name, extractor[1], layers)
    below, above = cut_below_trainable(name, extractor[1], layers)
    head = mlp(backbone_spec(name).feature_dim, *HEAD)
    start_state = copy.deepcopy((above.state_dict(), head.state_dict()))
    frozen = prepare_extractor(nn.Sequential(extractor[0], below), torch.device("cpu"))
    plain, test = torch.from_numpy(images), torch.from_numpy(test_images)
    mirrored, labels = plain.flip(-1), torch.as_tensor(labels)
    start = time.perf_counter()
    with torch.inference_mode():  # what featurize caches, once, in fp16
        cached = [_run(frozen, x).to(torch.float16).float() for x in (plain, mirrored)]
    cache_seconds = time.perf_counter() - start
    from_cache, from_pixels = nn.Sequential(above, head), nn.Sequential(frozen, above, head)
    if args.epochs:
        with torch.inference_mode():
            test_cached = _run(frozen, test).to(torch.float16).float()
    paths = {  # path -> (network, train inputs, test inputs)
        "activations": (from_cache, cached, test_cached if args.epochs else None),
        "images": (from_pixels, (plain, mirrored), test),
    }
    seconds, scores = {path: [] for path in paths}, {path: [] for path in paths}
    for seed in range(args.seeds):
        for path, (network, inputs, test_inputs) in paths.items():
            above.load_state_dict(start_state[0])  # the same start for every run
            head.load_state_dict(start_state[1])
            seconds[path] += _train(network, *inputs, labels, args.epochs, seed)
            if args.epochs:
                scores[path].append(_accuracy(network, test_inputs, test_labels))
    from_images, from_activations = seconds["images"], seconds["activations"]
    scored = {}
    if args.epochs:
        for path, accuracies in scores.items():
            scored[f"test_accuracy_from_{path}"] = round(sum(accuracies) / len(accuracies), 4)
        if args.seeds > 1:
            scored |= {f"test_accuracy_from_{path}_by_seed": scores[path] for path in paths}
    result = {
        "model": name,
        "trainable_layers": layers,
        "image_size": args.image_size,
        "images": len(images),
        "epochs": len(from_images) // args.seeds,
        "seeds": args.seeds,
        "activation_shape": list(cached[0].shape[1:]),
        "cache_seconds": round(cache_seconds, 2),  # the plain and the mirrored images
        "epoch_seconds_from_images": round(min(from_images), 2),
        "epoch_seconds_from_activations": round(min(from_activations), 2),
        "epoch_ratio": round(min(from_images) / min(from_activations), 1),
        **scored,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result
