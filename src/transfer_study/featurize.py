"""Run a backbone's frozen part once over each split and stream its output to disk, by batch."""

import math
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from transfer_study.core import paths, timing
from transfer_study.core.atomic import Rewritten, atomic_path, write_json
from transfer_study.core.progress import bars, progress
from transfer_study.core.stage import UserError, launcher_variable, stop_if_signalled
from transfer_study.data.splits import SPLITS, load_split
from transfer_study.inference import frozen_outputs, frozen_part, prepare_extractor
from transfer_study.nn.backbones import cached_inputs, count_params
from transfer_study.nn.device import (
    DTYPE_NAMES,
    default_device,
    enable_fast_cuda,
    featurize_dtype,
)

# Images per backbone call, to start with: CPU batches only need to amortize Python overhead;
# GPU batches aim to fill the device (VGG16 at 224 px in bf16 takes ~6 GiB for 256 images) and
# halve on out-of-memory.
BATCH_SIZE = {"cpu": 32, "cuda": 512}
PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}  # <model>.featurize_precision -> autocast
PROBE_BATCHES = 2  # timed batches of each precision, after one warm-up batch each
# auto keeps bf16 on a CPU where it runs at least this much faster than fp32: near a tie, the
# exact fp32 wins, and a noisy probe does not flip the cache from one run to the next.
BF16_MARGIN = 1.2


def _write_header(file, rows, feature_dim):
    """The .npy header of a rows x feature_dim float16 array whose data follows it."""
    header = {"descr": "<f2", "fortran_order": False, "shape": (rows, feature_dim)}
    np.lib.format.write_array_header_1_0(file, header)


@torch.inference_mode()
def featurize(
    extractor, images, out_path, feature_dim, device, desc="featurize", flip=False, dtype="auto"
):
    """Write extractor(images) as float16 (N x feature_dim) .npy, batch by batch; with `flip`,
    of the images mirrored left-right (flipped on the device).

    Each batch's features are appended to the .npy file as they come, so host memory holds one
    batch of features whatever the split's size (a memory map would keep every written page
    resident). On CUDA out of memory the batch is retried at half the size.
    `dtype` is the autocast dtype, None for fp32; "auto" picks featurize_dtype(device).
    Returns images per second.
    """
    if dtype == "auto":
        dtype = featurize_dtype(device)
    batch_size = BATCH_SIZE[device.type]
    source = torch.from_numpy(images)
    if device.type == "cuda":  # pinned once, so each batch's copy can overlap the compute
        source = source.pin_memory()
    start = time.perf_counter()
    with (
        atomic_path(out_path) as tmp,
        open(tmp, "wb") as out,
        progress(len(images), desc) as bar,
    ):
        _write_header(out, len(images), feature_dim)
        first = 0
        timing.work_starts()
        while first < len(images):
            stop_if_signalled()
            batch = source[first : first + batch_size].to(device, non_blocking=True)
            if flip:
                batch = batch.flip(-1)
            batch = batch.contiguous(memory_format=torch.channels_last)
            try:
                features = frozen_outputs(extractor, batch, device, dtype)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise UserError(f"{desc}: out of GPU memory even one image at a time") from None
                batch_size //= 2
                torch.cuda.empty_cache()
                message = f"{desc}: CUDA out of memory, retrying with batches of {batch_size}"
                bar.write(message, file=sys.stderr)
                continue
            out.write(features.cpu().numpy().tobytes())
            first += len(batch)
            bar.update(len(batch))
    return len(images) / (time.perf_counter() - start)


def choose_precision(precision, extractor, images, device):
    """(the frozen pass's autocast dtype, {"bf16": images/s, "fp32": images/s} of the probe, or
    {}). `precision` bf16 or fp32: as asked. auto: on a GPU, autocast_dtype's (bf16, or fp16
    without bf16 units); on a CPU without bf16 instructions, fp32; on one with them, bf16 and
    fp32 each run PROBE_BATCHES batches of `images`, and bf16 is kept where it is BF16_MARGIN
    times as fast: it pays on some CPUs and backbones, and costs on others."""
    if precision != "auto":
        return PRECISIONS[precision], {}
    if device.type != "cpu" or featurize_dtype(device) is None:
        return featurize_dtype(device), {}
    batch = torch.from_numpy(images[: BATCH_SIZE["cpu"]])
    rates = {name: _probe_rate(extractor, batch, dtype) for name, dtype in PRECISIONS.items()}
    return (torch.bfloat16 if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else None), rates


@torch.inference_mode()
def _probe_rate(extractor, batch, dtype):
    """Images per second of the frozen pass over `batch` on the CPU, autocast to `dtype`."""
    batch = batch.contiguous(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    frozen_outputs(extractor, batch, cpu, dtype)  # oneDNN picks its kernels at the first batch
    start = time.perf_counter()
    for _ in range(PROBE_BATCHES):
        frozen_outputs(extractor, batch, cpu, dtype)
    return round(PROBE_BATCHES * len(batch) / (time.perf_counter() - start), 1)


@torch.inference_mode()
def _output_shape(extractor, image, device):
    """The shape of one image's output, by running it."""
    return tuple(extractor(torch.from_numpy(image).to(device)).shape[1:])


def _check_disk(name, section, shape, rows):
    """Refuse, in one line, a cache of `rows` images of `shape` float16 values that would not
    fit in the free space of the features folder."""
    folder = paths.features_dir(name).absolute()
    existing = next(f for f in (folder, *folder.parents) if f.exists())  # nothing made yet
    needed, free = rows * math.prod(shape) * 2, shutil.disk_usage(existing).free
    if needed > free:
        values = " x ".join(map(str, shape))
        raise UserError(
            f"{name}.trainable_layers = {section.trainable_layers}: featurize_{name} would cache "
            f"{values} values an image, {needed / 2**30:,.1f} GiB for {rows:,} images, more than "
            f"the {free / 2**30:,.1f} GiB free in {folder}; train more blocks, lower "
            f"{name}.image_size, or free disk space"
        )


def torchrun_ranks():
    """(rank, world size, local rank) under torchrun, else (0, 1, 0)."""
    rank, world = launcher_variable("RANK"), launcher_variable("WORLD_SIZE", unset=1)
    return rank, world, launcher_variable("LOCAL_RANK")


def _concatenate(parts, path):
    """Join the ranks' part files into one .npy, streaming, then remove the parts."""
    arrays = [np.load(part, mmap_mode="r") for part in parts]
    chunk = 4096  # rows per write, to keep memory bounded
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        _write_header(out, sum(len(a) for a in arrays), arrays[0].shape[1])
        for array in arrays:
            for first in range(0, len(array), chunk):
                out.write(np.ascontiguousarray(array[first : first + chunk]).tobytes())
    for part in parts:
        part.unlink()


def featurize_model(name, section, hflip=False, crop=0):
    """Cache the frozen part of a backbone's output for every split, with a meta file and timing
    metrics: its features when it is frozen whole, its activations at the cut below its
    trainable blocks when it is partly fine-tuned without crops (`crop`: the shared
    train.crop; backbones.cached_inputs decides).

    The mirrored test images' too, always (one more pass over test), so that evaluate.hflip,
    which averages the two predictions, reruns evaluate alone. With `hflip`, the mirrored train
    images' too (one more pass over train), so that training can flip at random and still read
    the cache. Under torchrun each rank featurizes its slice of every split on its own GPU, and
    rank 0 joins the slices. A cache that would not fit on the disk is refused before any work;
    a failed or interrupted run leaves the previous cache and its metrics as they were.
    """
    rank, world, local_rank = torchrun_ranks()
    bars()  # a bad TRANSFER_STUDY_PROGRESS is refused before any work
    device = default_device()
    if world > 1:
        dist.init_process_group("gloo")  # barriers only: the features travel through files
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
    enable_fast_cuda()
    inputs = cached_inputs(name, section, crop)
    extractor = prepare_extractor(frozen_part(name, section, inputs), device)
    jobs = [(split, split, False) for split in SPLITS]
    if hflip:
        jobs.append((paths.FLIPPED_TRAIN, "train", True))
    jobs.append((paths.FLIPPED_TEST, "test", True))
    splits = {split: load_split(paths.split_file(split)).images for split in SPLITS}
    shape = _output_shape(extractor, splits["train"][:1], device)
    dtype, probe = choose_precision(section.featurize_precision, extractor, splits["train"], device)
    if world > 1:  # every rank casts as rank 0 chose: one cache, one precision
        chosen = [dtype]
        dist.broadcast_object_list(chosen, src=0)
        (dtype,) = chosen
    rows = sum(len(splits[split]) for _, split, _ in jobs)
    _check_disk(name, section, shape, rows)
    # The cache is one set: a failed or interrupted pass puts the previous one back whole, and
    # its metrics stay with it. Rank 0 sets it aside before any rank writes its part there.
    with Rewritten(paths.features_dir(name)) as cache:
        if rank == 0:
            cache.begin()
        if world > 1:
            dist.barrier()
        begun = time.perf_counter()  # the passes only: not a first download of the weights
        timings = {}
        for out_name, split, flip in jobs:
            images = splits[split]
            path = paths.features_file(name, out_name)
            parts = [path.with_name(f"{path.stem}.part{r}.npy") for r in range(world)]
            mine = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
            start = time.perf_counter()
            featurize(
                extractor,
                images[mine],
                parts[rank] if world > 1 else path,
                math.prod(shape),
                device,
                desc=f"{name} {out_name}",
                flip=flip,
                dtype=dtype,
            )
            if world > 1:
                dist.barrier()
                if rank == 0:
                    _concatenate(parts, path)
            timings[out_name] = len(images) / (time.perf_counter() - start)
            timing.count_images(len(images))  # every rank's slice
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
            if rank != 0:
                return None
        meta = {
            "inputs": inputs,
            "feature_dim": math.prod(shape),
            "shape": list(shape),  # of one image's features or activations
            "trainable_layers": section.trainable_layers,
            "backbone_params": count_params(extractor),  # the frozen part's
            "image_size": section.image_size,
            "weights": section.weights,
        }
        write_json(paths.features_meta(name), meta)
        metrics = {
            # Every pass over the splits: the report's cost of the frozen backbone.
            "seconds": round(time.perf_counter() - begun, 2),
            "images_per_second": {s: round(v, 1) for s, v in timings.items()},
            "device": str(device) if world == 1 else f"{world} x {device.type}",
            "precision": DTYPE_NAMES[dtype],
            # featurize_precision auto on a CPU: what each ran at (images/s) when it chose
            **({"precision_probe": probe} if probe else {}),
        }
        write_json(paths.featurize_metrics(name), metrics)
    return metrics
