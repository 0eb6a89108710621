"""The fit loop shared by the MLP, the heads and fine-tuning: model file, history, metrics."""

import dataclasses
import io
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from transfer_study.core import paths
from transfer_study.core.atomic import atomic_paths, json_text
from transfer_study.core.config import MlpParams, cached_inputs
from transfer_study.core.progress import bars
from transfer_study.core.stage import UserError
from transfer_study.data.splits import draw_per_class
from transfer_study.nn.backbones import UnreadableTensors, count_params, load_tensors
from transfer_study.nn.build import (
    build_net,
    check_trainable,
    data_stats,
    load_inputs,
    read_cache,
    read_cache_meta,
)
from transfer_study.nn.device import (
    LIGHTNING_PRECISION,
    autocast_dtype,
    enable_fast_cuda,
    memory_bytes,
)
from transfer_study.train.live import LiveProgress, progress_bar_callbacks
from transfer_study.train.loaders import InMemoryData, data_device, trains_on_gpu
from transfer_study.train.module import Classifier
from transfer_study.train.optim import param_groups
from transfer_study.train.rendezvous import BoundedDDP
from transfer_study.train.resume import (
    checkpoint_folder,
    epoch_history,
    kept_while_resumable,
    run_key_of,
)
from transfer_study.train.stop import StopOnSignal

MIN_EPOCH_IMAGES = 4096  # images an epoch passes over at the least, with train.per_class

# Tensors already in memory need no loader workers; Lightning's hint says otherwise.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# InMemoryData moves nothing itself; the module's on_after_batch_transfer is meant to run.
warnings.filterwarnings("ignore", ".*overridden `on_after_batch_transfer`.*")
# The checkpoint folder holds our run_key file before Lightning writes there.
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")


def _flipped_features(name, rows):
    path = paths.features_file(name, paths.FLIPPED_TRAIN)
    if not path.exists():
        raise UserError(
            f"{name}.train.hflip is true but {path} is missing: set the shared train.hflip: true "
            f"so that featurize_{name} caches the mirrored train images' features"
        )
    return read_cache(name, paths.FLIPPED_TRAIN, rows)


def _feature_meta(name, inputs, section):
    """The meta file featurize_<name> wrote, once it is the cache this training reads."""
    meta = read_cache_meta(name)
    cut = section.trainable_layers if inputs == "activations" else 0
    if meta.get("inputs", "features") != inputs or meta.get("trainable_layers", 0) != cut:
        raise UserError(
            f"features/{name} holds the cache of another {name}.trainable_layers or train.crop: "
            f"rerun featurize_{name} (dvc repro featurize_{name})"
        )
    return meta


def resolve_precision(train):
    """Lightning's precision: train.precision, or for auto, mixed precision in the dtype
    autocast_dtype picks on the GPU (16-mixed scales the loss, as fp16 gradients need), fp32 on
    the CPU."""
    if train.precision != "auto":
        return train.precision
    device = torch.device("cuda" if trains_on_gpu(train) else "cpu")
    return LIGHTNING_PRECISION[autocast_dtype(device)]


def check_accelerator(train):
    if train.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            "train.accelerator = gpu, but no CUDA device is visible; set it to auto or cpu"
        )


def train_model(name, params, callbacks=()):
    """Fit model `name`; write its model file, metrics and history. Returns the metrics.

    Checkpoints go to checkpoints/<name> while it trains; with train.resume, a run of the same
    configuration on the same inputs that was interrupted continues from its last epoch. A run
    that fails leaves the previous run's outputs as they were.
    `callbacks`: extra Lightning callbacks.
    """
    section = params.model(name)
    train = section.train
    check_accelerator(train)
    bars()  # a bad TRANSFER_STUDY_PROGRESS is refused before any work
    enable_fast_cuda()
    pl.seed_everything(params.seed, workers=True)
    inputs = cached_inputs(name, section, params.train.crop)
    train_x, train_data = load_inputs(name, inputs, "train")
    val_x, val_data = load_inputs(name, inputs, "val")
    train_y, val_y, classes = train_data.labels, val_data.labels, train_data.classes
    drawn, labeled, batch_size = None, train_data.images, train.batch_size
    if train.per_class is not None:
        key = f"{name}.train.per_class"
        drawn = draw_per_class(train_y, classes, train.per_class, params.seed, key)
        labeled = train_data.images[drawn]
        batch_size = min(batch_size, len(drawn))  # 10 images of 10 classes: batches of 100
    elif train.batch_size > len(train_y):
        raise UserError(
            f"{name}.train.batch_size = {train.batch_size} is larger than the train split "
            f"({len(train_y)} images); lower it or raise data.train_size"
        )
    features = inputs is not None  # cached: features, or activations at the cut
    feature_meta = _feature_meta(name, inputs, section) if features else {}
    stats = data_stats(labeled)  # of the labeled images only
    feature_dim = feature_meta.get("feature_dim")
    cut = {"activation_shape": feature_meta["shape"]} if inputs == "activations" else {}
    on_gpu = trains_on_gpu(train)
    memory = memory_bytes(torch.device("cuda" if on_gpu else "cpu"))
    check_trainable(name, section, len(classes), stats, feature_dim, memory)
    net = build_net(name, section, len(classes), stats, feature_dim, **cut)
    if not features and not isinstance(section, MlpParams):
        # A backbone fine-tuned from pixels: convolutions in NHWC, the layout GPU tensor cores
        # (and oneDNN on CPUs) run fastest; its 2-D weights and the saved values are unchanged.
        net = net.to(memory_format=torch.channels_last)
    if train.compile:
        net.compile()  # in place: the state_dict keeps its keys; compiles at the first batch
    groups = param_groups(name, section, net)
    module = Classifier(net, train, len(classes), pixels=not features, param_groups=groups)
    train_split = (train_x, train_y)
    if features and train.hflip:
        train_split += (_flipped_features(name, len(train_y)),)
    if train.per_class is not None:
        # A small draw is passed over several times an epoch (an epoch is at least
        # MIN_EPOCH_IMAGES images), so that max_epochs and patience count comparable optimizer
        # steps at every size.
        chosen = np.tile(drawn, -(-MIN_EPOCH_IMAGES // len(drawn)))
        train_split = tuple(array[chosen] for array in train_split)
    device = data_device(train, sum(x.nbytes for x in (*train_split, val_x)))
    pin = device is None and on_gpu  # host tensors bound for a GPU
    data = InMemoryData(train_split, (val_x, val_y), batch_size, params.seed, pin, device)

    run_key = run_key_of(section, params.seed, (*train_split, val_x, val_y))
    checkpoints, resume_from, start_over = checkpoint_folder(name, run_key, train.resume)
    logs = sorted(checkpoints.glob("logs/version_*/metrics.csv"))
    live = LiveProgress(name, epoch_history(logs) if resume_from and logs else None)
    trainer, best = _trainer(train, checkpoints, start_over, [live, *callbacks])
    # A failed run leaves the previous run's outputs as they were: the model, history and
    # metrics are renamed into place last, together; DVCLive's folder is put back.
    with live.previous, kept_while_resumable(checkpoints, trainer):
        if start_over is not None and not isinstance(trainer.strategy, BoundedDDP):
            start_over()  # alone: no peers to wait for
        started = time.perf_counter()
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume_from)
        except SystemExit:
            # Lightning turns Ctrl+C (and SIGTERM, which the stage maps to it) into sys.exit(1):
            # an interruption is one, for the stage's exit status 130 and its one line.
            if trainer.interrupted:
                raise KeyboardInterrupt from None
            raise
        seconds = time.perf_counter() - started
        if not trainer.is_global_zero:  # rank 0 writes the outputs
            return None
        history = epoch_history(sorted(checkpoints.glob("logs/version_*/metrics.csv")))
        if not np.isfinite(history["val_loss"]).any():  # inf too: no epoch to keep
            raise UserError(f"{name}: val_loss was never finite; lower {name}.train.lr")
        try:
            state = load_tensors(best.best_model_path)
        except UnreadableTensors as error:
            raise UserError(
                f"{name}: its best checkpoint {best.best_model_path}: {error}"
            ) from None
        module.load_state_dict(state["state_dict"])

        config = {
            "name": name,
            "section": dataclasses.asdict(section),
            "classes": list(classes),
            "data": stats,
            "feature_dim": feature_dim,
            "inputs": inputs,
            "activation_shape": cut.get("activation_shape"),
            "seed": params.seed,
        }
        kept = history.loc[history["val_loss"].idxmin()]  # the epoch ModelCheckpoint kept
        metrics = {
            "kept_val_loss": float(kept["val_loss"]),
            "kept_val_accuracy": float(kept["val_acc"]),
            "kept_epoch": int(kept["epoch"]),
            "epochs": len(history),
            "train_seconds": round(seconds, 2),
            "resumed": resume_from is not None,
            "trainable_params": count_params(net, trainable_only=True),
            "total_params": count_params(net) + feature_meta.get("backbone_params", 0),
            "lr": train.lr,
            "optimizer": train.optimizer,
            "batch_size": batch_size,
            "train_images": len(labeled),  # labeled: train.per_class of each class, or the split
            "per_class": train.per_class,
            "precision": resolve_precision(train),
            "device": _device_name(trainer),
            "versions": {
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "lightning": pl.__version__,
            },
        }
        live.finish(kept, len(history), seconds)
        _write_outputs(name, module.net, config, history, metrics)
        return metrics


def _strategy(train, prepare):
    """Lightning's strategy: alone, its own; over several processes, DDP whose rank 0 runs
    `prepare` once all have joined, within train.rendezvous_timeout."""
    if train.strategy == "auto" and train.devices * train.num_nodes == 1:
        return "auto"
    start_method = "spawn" if train.strategy == "ddp_spawn" else "popen"  # Lightning's names
    return BoundedDDP(train.rendezvous_timeout, prepare, start_method)


def _trainer(train, checkpoints, prepare, callbacks):
    """(Lightning Trainer, its ModelCheckpoint): early stopping and the kept epoch on val loss.
    `prepare`: what empties the checkpoint folder for a fresh run (None when resuming)."""
    # Saved at the end of each epoch, so that a resumed run starts the next epoch (a checkpoint
    # saved at validation end would make it replay the epoch).
    best = ModelCheckpoint(
        dirpath=checkpoints,
        monitor="val/loss",
        mode="min",
        save_last=True,
        save_on_train_epoch_end=True,
    )
    stop = EarlyStopping(
        monitor="val/loss", mode="min", patience=train.patience, min_delta=train.min_delta
    )
    show_bar, bar = progress_bar_callbacks()
    trainer = pl.Trainer(
        max_epochs=train.max_epochs,
        accelerator=train.accelerator,
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=_strategy(train, prepare),
        use_distributed_sampler=False,  # InMemoryData shards by rank itself
        precision=resolve_precision(train),
        deterministic=train.deterministic,
        callbacks=[StopOnSignal(), best, stop, *bar, *callbacks],
        enable_progress_bar=show_bar,
        # One log folder per attempt: Lightning's CSV logger empties its folder when it starts.
        logger=CSVLogger(checkpoints, name="logs"),
        default_root_dir=checkpoints,
        enable_model_summary=False,
        log_every_n_steps=1,  # metrics are logged per epoch; this only silences a hint
    )
    return trainer, best


def _write_outputs(name, net, config, history, metrics):
    """Model, history and metrics as one set: every file is written before any is renamed into
    place. torch.save goes through memory first: writing to a full disk then raises an OSError
    (one line), not the C++ stream error torch.save to a file would."""
    model_bytes = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "config": config}, model_bytes)
    outputs = (paths.model_file(name), paths.history_file(name), paths.train_metrics(name))
    with atomic_paths(*outputs) as (model_tmp, history_tmp, metrics_tmp):
        model_tmp.write_bytes(model_bytes.getvalue())
        history.to_csv(history_tmp, index=False)
        metrics_tmp.write_text(json_text(metrics))


def _device_name(trainer):
    device = trainer.strategy.root_device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
