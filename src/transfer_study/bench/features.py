"""Side-by-side benchmark: the notebooks' per-image PIL pipeline against cached features.

python -m transfer_study.bench [--quick] [--archive cifar.tar.gz] [--backbones vgg16 inception]
python -m transfer_study.bench study ...: the whole pipeline timed stage by stage (bench/study.py)

Both paths run in one process on the same images, so the printed ratios hold on a shared,
noisy machine where absolute times do not. The last line is JSON with the ratios.
"""

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from transfer_study.core.stage import exit_on_user_error
from transfer_study.data.readers import read_cifar10
from transfer_study.data.splits import channel_stats
from transfer_study.featurize import BATCH_SIZE, choose_precision, featurize
from transfer_study.inference import prepare_extractor
from transfer_study.nn.backbones import backbone_spec, feature_extractor
from transfer_study.nn.device import (
    DTYPE_NAMES,
    default_device,
    enable_fast_cuda,
)
from transfer_study.nn.layers import Preprocess, mlp
from transfer_study.train.loaders import make_loader

EPOCHS = 6  # the studies' VGG16 run: six epochs
HEAD = ((128, 64), "leaky_relu", 0.3)  # params.yaml's default head
MLP_HIDDEN = (256, 64)


class PeakMemory:
    """Peak resident memory (this process and its loader workers) and CUDA allocation."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self):
        process = psutil.Process()
        while self.running:
            try:
                rss = process.memory_info().rss + sum(
                    child.memory_info().rss for child in process.children(recursive=True)
                )
            except psutil.Error:  # a worker ended between listing and reading
                continue
            self.peak = max(self.peak, rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0

    def describe(self):
        cuda = f", CUDA max allocated {self.cuda_peak / 2**30:.2f} GiB" if self.cuda_peak else ""
        return f"peak RSS {self.peak / 2**30:.2f} GiB{cuda}"


class PILImages(Dataset):
    """The notebooks' way: one PIL image at a time through Resize, ToTensor, Normalize."""

    def __init__(self, images, labels, size, mean, std):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i].transpose(1, 2, 0))), self.labels[i]


def _on_gpu(device):
    # As the training stages do for data that fits: tensors on the GPU, gathered there per batch.
    return device if device.type == "cuda" else None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_epoch(batches, model, trainable, device, prepare=lambda x: x):
    """One epoch of forward, loss, backward and step on `trainable`; returns seconds."""
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    _sync(device)
    start = time.perf_counter()
    for inputs, labels in batches:
        inputs = prepare(inputs.to(device, non_blocking=True))
        loss = F.cross_entropy(model(inputs).float(), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def _pil_loader(images, labels, size, mean, std, batch_size, device):
    workers = min(4, psutil.cpu_count() or 1)
    return DataLoader(
        PILImages(images, labels, size, mean, std),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def bench_backbone(name, images, labels, size, device, weights, batch_size=32, head_batch_size=128):
    """Reference epoch (PIL + full frozen model) vs featurize once + head epochs.

    Batches of 32 for the reference, as in the notebooks (its cost is the backbone's, whatever
    the batch); 128 for the head, params.yaml's default.
    """
    spec = backbone_spec(name)
    extractor = prepare_extractor(feature_extractor(name, weights, size), device)
    # The reference is the plain frozen body (fp32, default memory format); its preprocessing
    # happens per image, in PIL, in the loader.
    body = feature_extractor(name, weights, size)[1].eval().requires_grad_(False).to(device)
    head = mlp(spec.feature_dim, *HEAD[:1], 10, *HEAD[1:]).to(device)
    results = {}

    reference = torch.nn.Sequential(body, head)
    loader = _pil_loader(images, labels, size, spec.input.mean, spec.input.std, batch_size, device)
    with PeakMemory() as memory:
        seconds = _train_epoch(loader, reference, list(head.parameters()), device)
    results["reference_epoch_s"] = seconds
    results["reference_images_per_s"] = len(labels) / seconds
    print(
        f"  reference epoch (PIL resize per image, frozen {name} + head, fp32): "
        f"{seconds:.2f} s, {len(labels) / seconds:.1f} images/s, {memory.describe()}"
    )

    # As the stage's featurize_precision: auto chooses (on a CPU, by a probe of both).
    dtype, probe = choose_precision("auto", extractor, images, device)
    precision = DTYPE_NAMES[dtype]
    if probe:
        print(
            f"  featurize precision probe: bf16 {probe['bf16']:.1f} images/s, fp32 "
            f"{probe['fp32']:.1f} images/s ({probe['bf16'] / probe['fp32']:.2f}x): auto keeps "
            f"{precision}"
        )
    with tempfile.TemporaryDirectory() as tmp, PeakMemory() as memory:
        out = Path(tmp) / "features.npy"
        featurize(
            extractor,
            images[: BATCH_SIZE[device.type]],
            out,
            spec.feature_dim,
            device,
            desc="warm-up",
            dtype=dtype,
        )  # cuDNN autotuning and lazy init stay out of the timing
        _sync(device)
        start = time.perf_counter()
        featurize(
            extractor, images, out, spec.feature_dim, device, desc=f"featurize {name}", dtype=dtype
        )
        _sync(device)
        seconds = time.perf_counter() - start
        features = np.load(out)
    results["featurize_s"] = seconds
    results["featurize_images_per_s"] = len(labels) / seconds
    print(
        f"  ours: featurize once (batched resize on {device.type}, channels_last, {precision}): "
        f"{seconds:.2f} s, {len(labels) / seconds:.1f} images/s, {memory.describe()}"
    )

    batches = make_loader(features, labels, head_batch_size, shuffle=True, device=_on_gpu(device))
    _train_epoch(batches, head, list(head.parameters()), device, lambda x: x.float())  # warm-up
    seconds = _train_epoch(batches, head, list(head.parameters()), device, lambda x: x.float())
    results["head_epoch_s"] = seconds
    print(f"  ours: head epoch on cached features: {seconds * 1000:.1f} ms")
    return results


def precision_check(name, data, size, device, weights, epochs=10):
    """Head test accuracy on fp32 features against bf16 features of the same images."""
    (train_x, train_y), (test_x, test_y) = data
    spec = backbone_spec(name)
    extractor = prepare_extractor(feature_extractor(name, weights, size), device)
    features = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            for split, images in (("train", train_x), ("test", test_x)):
                out = Path(tmp) / f"{label}_{split}.npy"
                featurize(extractor, images, out, spec.feature_dim, device, desc=label, dtype=dtype)
                features[label, split] = np.load(out).astype(np.float32)
    reference = features["fp32", "test"]
    relative_error = float(
        np.linalg.norm(features["bf16", "test"] - reference) / np.linalg.norm(reference)
    )
    accuracy = {}
    for label in ("fp32", "bf16"):
        torch.manual_seed(0)
        head = mlp(spec.feature_dim, *HEAD[:1], 10, *HEAD[1:]).to(device)
        batches = make_loader(
            features[label, "train"], train_y, 128, shuffle=True, device=_on_gpu(device)
        )
        for epoch in range(epochs):
            batches.sampler.set_epoch(epoch)
            _train_epoch(batches, head, list(head.parameters()), device)
        with torch.no_grad():
            logits = head.eval()(torch.as_tensor(features[label, "test"]).to(device))
        accuracy[label] = float((logits.argmax(1).cpu() == torch.as_tensor(test_y)).float().mean())
    print(
        f"  {name} at {size} px, weights {weights}: feature relative error bf16 vs fp32 "
        f"{relative_error:.4f}; head test accuracy fp32 {accuracy['fp32']:.2%}, "
        f"bf16 {accuracy['bf16']:.2%}"
    )
    return {
        f"{name}_bf16_feature_rel_error": round(relative_error, 5),
        f"{name}_bf16_minus_fp32_accuracy_points": round(
            100 * (accuracy["bf16"] - accuracy["fp32"]), 2
        ),
    }


def bench_mlp(images, labels, device, batch_size=128):
    """Per-image DataLoader (PIL, ToTensor, Normalize) vs uint8 tensors indexed per batch."""
    size = images.shape[-1]
    mean, std = channel_stats(images)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), mlp(3 * size * size, MLP_HIDDEN, 10, "leaky_relu", 0.2)
    ).to(device)
    loader = _pil_loader(images, labels, size, mean, std, batch_size, device)
    reference = _train_epoch(loader, net, list(net.parameters()), device)
    preprocess = Preprocess(size, mean, std).to(device)
    batches = make_loader(images, labels, batch_size, shuffle=True, device=_on_gpu(device))
    _train_epoch(batches, net, list(net.parameters()), device, preprocess)  # warm-up
    ours = _train_epoch(batches, net, list(net.parameters()), device, preprocess)
    print(
        f"  MLP epoch: reference (per-image DataLoader) {reference:.3f} s, "
        f"ours (in-memory uint8 batches) {ours:.3f} s"
    )
    return {"reference_epoch_s": reference, "epoch_s": ours}


def _input_size(name, override):
    spec = backbone_spec(name)
    return max(override, spec.input.min_size) if override else spec.input.default_size


def load_images(archive, count, seed=0):
    """`count` train images of the archive, or random ones where no archive is given."""
    if archive:
        train, _ = read_cifar10(archive)
        return train.images[:count], train.labels[:count]
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, count))


def run_precision_check(args, names, count, device):
    """Train on the archive's first `count` train images, test on its whole test batch."""
    train, test = read_cifar10(args.archive)
    data = ((train.images[:count], train.labels[:count]), (test.images, test.labels))
    summary = {}
    for name in names:
        size = _input_size(name, args.image_size)
        summary.update(precision_check(name, data, size, device, args.weights))
    summary["device"] = str(device)
    print(json.dumps(summary))
    return summary


@exit_on_user_error
def main(args):
    """The benchmark, for arguments parsed by bench/__main__.py (before torch is imported)."""
    count = args.images or (256 if args.quick else 4096)
    names = args.backbones or (["vgg16"] if args.quick else ["vgg16", "inception"])
    device = default_device()
    enable_fast_cuda()
    torch.manual_seed(0)
    if args.precision_check:
        return run_precision_check(args, names, count, device)
    images, labels = load_images(args.archive, count)
    labels = torch.as_tensor(labels)
    device_name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else (f"cpu ({torch.get_num_threads()} threads)")
    )
    print(f"device: {device_name}; {count} images; projected times are for {EPOCHS} epochs")

    summary = {}
    for name in names:
        size = _input_size(name, args.image_size)
        print(f"{name} at {size} px:")
        r = bench_backbone(name, images, labels, size, device, args.weights)
        reference_total = EPOCHS * r["reference_epoch_s"]
        ours_total = r["featurize_s"] + EPOCHS * r["head_epoch_s"]
        print(
            f"  projected {EPOCHS} epochs: reference {reference_total:.1f} s, "
            f"ours {ours_total:.1f} s (featurize + {EPOCHS} head epochs)"
        )
        summary[f"{name}_{EPOCHS}epoch_speedup"] = round(reference_total / ours_total, 2)
        summary[f"{name}_head_epoch_speedup"] = round(r["reference_epoch_s"] / r["head_epoch_s"], 1)
        summary[f"{name}_featurize_speedup"] = round(
            r["featurize_images_per_s"] / r["reference_images_per_s"], 2
        )
        summary[f"{name}_featurize_images_per_s"] = round(r["featurize_images_per_s"], 1)
    m = bench_mlp(images, labels, device)
    summary["mlp_epoch_speedup"] = round(m["reference_epoch_s"] / m["epoch_s"], 2)
    if "vgg16" in names:
        summary["head_epoch_speedup"] = summary["vgg16_head_epoch_speedup"]
        summary["featurize_speedup"] = summary["vgg16_featurize_speedup"]
    summary["device"] = device_name
    print(json.dumps(summary))
    return summary
