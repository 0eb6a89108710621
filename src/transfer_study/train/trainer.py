"""Lightning's Trainer for a model's train section: devices, precision, strategy, callbacks."""

import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from transfer_study.core.stage import UserError
from transfer_study.nn.device import LIGHTNING_PRECISION, autocast_dtype
from transfer_study.train.live import progress_bar_callbacks
from transfer_study.train.loaders import training_device
from transfer_study.train.rendezvous import BoundedDDP
from transfer_study.train.stop import StopOnSignal
from transfer_study.train.timing import BatchTiming

# Tensors already in memory need no loader workers; Lightning's hint says otherwise.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# InMemoryData moves nothing itself; the module's on_after_batch_transfer is meant to run.
warnings.filterwarnings("ignore", ".*overridden `on_after_batch_transfer`.*")
# The checkpoint folder holds our run_key file before Lightning writes there.
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")


def check_accelerator(train):
    if train.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            "train.accelerator = gpu, but no CUDA device is visible; set it to auto or cpu"
        )


def resolve_precision(train):
    """Lightning's precision: train.precision, or for auto, mixed precision in the dtype
    autocast_dtype picks on the GPU (16-mixed scales the loss, as fp16 gradients need), fp32 on
    the CPU."""
    if train.precision != "auto":
        return train.precision
    device = training_device(train)
    return LIGHTNING_PRECISION[autocast_dtype(device)]


def build_trainer(train, checkpoints, prepare, callbacks):
    """(Lightning Trainer, its ModelCheckpoint): early stopping and the kept epoch on val loss.
    `prepare`: what empties the checkpoint folder for a fresh run (None when resuming).
    `callbacks`: more Lightning callbacks."""
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
        callbacks=[StopOnSignal(), BatchTiming(), best, stop, *bar, *callbacks],
        enable_progress_bar=show_bar,
        # One log folder per attempt: Lightning's CSV logger empties its folder when it starts.
        logger=CSVLogger(checkpoints, name="logs"),
        default_root_dir=checkpoints,
        enable_model_summary=False,
        log_every_n_steps=1,  # metrics are logged per epoch; this only silences a hint
    )
    return trainer, best


def _strategy(train, prepare):
    """Lightning's strategy: alone, its own; over several processes, DDP whose rank 0 runs
    `prepare` once all have joined, within train.rendezvous_timeout."""
    if train.strategy == "auto" and train.devices * train.num_nodes == 1:
        return "auto"
    start_method = "spawn" if train.strategy == "ddp_spawn" else "popen"  # Lightning's names
    return BoundedDDP(train.rendezvous_timeout, prepare, start_method)


def fit(trainer, module, data, resume_from, prepare):
    """Train `module` on the data module `data` from the checkpoint `resume_from` (None: from
    the start); returns the seconds it took. `prepare`: as build_trainer's."""
    if prepare is not None and not isinstance(trainer.strategy, BoundedDDP):
        prepare()  # alone: no peers to wait for
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    except SystemExit:
        # Lightning turns Ctrl+C (and SIGTERM, which the stage maps to it) into sys.exit(1):
        # an interruption is one, for the stage's exit status 130 and its one line.
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    return time.perf_counter() - started


def device_name(trainer):
    """The GPU's name, or "cpu"."""
    device = trainer.strategy.root_device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
