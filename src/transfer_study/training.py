"""One generic LightningModule and the fit loop shared by the MLP, the heads and fine-tuning."""

import dataclasses
import hashlib
import io
import json
import shutil
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from . import layout, timing
from .atomic import atomic_paths, json_text
from .errors import UserError
from .hardware import enable_fast_cuda
from .models import UnreadableTensors, backbone_spec, count_params, load_tensors
from .nets import augment
from .networks import build_net, data_stats, load_inputs
from .optim import build_optimizer, build_scheduler, scheduled
from .params import MlpParams, uses_features
from .progress import LiveProgress

# Tensors already in memory need no loader workers; Lightning's hint says otherwise.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# InMemoryData moves nothing itself; the module's on_after_batch_transfer is meant to run.
warnings.filterwarnings("ignore", ".*overridden `on_after_batch_transfer`.*")
# The checkpoint folder holds our run_key file before Lightning writes there.
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")


class Classifier(pl.LightningModule):
    """Any network mapping a batch to class logits: shared step, per-split accuracy.

    `pixels`: the inputs are images, augmented on the device (train.hflip, train.crop).
    `param_groups`: [{"params": [...], "lr_scale": x}], the optimizer's groups; default: every
    trainable parameter at train.lr.
    """

    def __init__(self, net, train, num_classes, pixels=False, param_groups=None):
        super().__init__()
        self.net = net
        self.train_params = train
        self.pixels = pixels
        self.param_groups = param_groups
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        # Batch norms whose weights are frozen keep their ImageNet statistics in training too.
        self.frozen_norms = [
            m for m in net.modules() if isinstance(m, _BatchNorm) and not m.weight.requires_grad
        ]

    def train(self, mode=True):
        super().train(mode)
        for norm in self.frozen_norms:
            norm.eval()
        return self

    def forward(self, inputs):
        return self.net(inputs)

    def on_save_checkpoint(self, checkpoint):
        # The random state too (dropout, flips, crops), so that a resumed run draws what the
        # uninterrupted run would have drawn.
        checkpoint["rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint):
        torch.set_rng_state(checkpoint["rng_state"])
        if torch.cuda.is_available() and "cuda_rng_state" in checkpoint:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng_state"])

    def on_after_batch_transfer(self, batch, dataloader_idx):
        inputs, labels = batch
        if inputs.dtype == torch.float16:  # cached features are stored as fp16 to halve memory
            inputs = inputs.float()
        if self.pixels and self.trainer.training:
            inputs = augment(inputs, self.train_params.hflip, self.train_params.crop)
        return inputs, labels

    def _step(self, batch, split):
        inputs, labels = batch
        timing.work_starts()  # the first batch (Lightning's sanity check's, a val batch)
        logits = self.net(inputs).float()
        # Smoothed targets in training only: val/loss stays the plain cross-entropy that early
        # stopping and the kept epoch are judged by.
        smoothing = self.train_params.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        accuracy = getattr(self, f"{split}_acc")
        accuracy(logits, labels)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        if self.train_params.l1 > 0:
            # L1 on weight matrices only, as Keras' kernel_regularizer did in the studies.
            named = self.net.named_parameters()
            weights = [p for n, p in named if p.requires_grad and n.endswith("weight")]
            loss = loss + self.train_params.l1 * sum(w.abs().sum() for w in weights)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        timing.count_images(len(batch[1]) * self.trainer.world_size)  # every rank's shard

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        lr = self.train_params.lr
        groups = self.param_groups or [{"params": _trainable(self), "lr_scale": 1.0}]
        groups = [{"params": g["params"], "lr": lr * g["lr_scale"]} for g in groups]
        optimizer = build_optimizer(groups, self.train_params)
        if not scheduled(self.train_params):
            return optimizer
        # Batches per epoch (this process's shard): the schedule steps after every batch.
        steps_per_epoch = self.trainer.estimated_stepping_batches // self.trainer.max_epochs
        scheduler = build_scheduler(optimizer, self.train_params, steps_per_epoch)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class _Batches(Dataset):
    """In-memory tensors indexed a whole batch at a time (one gather, no per-sample Python).

    With `flipped` (features of the mirrored images), each sample of a batch comes from either
    at random: horizontal-flip augmentation on cached features.
    """

    def __init__(self, inputs, labels, flipped=None):
        self.inputs, self.labels, self.flipped = inputs, labels, flipped

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, indices):
        indices = torch.as_tensor(indices)
        inputs = self.inputs[indices]
        if self.flipped is not None:
            use_flipped = torch.rand(len(indices)) < 0.5
            inputs = torch.where(
                use_flipped.to(inputs.device)[:, None], self.flipped[indices], inputs
            )
        return inputs, self.labels[indices]


class _ShardBatches(BatchSampler):
    """Batches of this process's shard of the indices, reshuffled each epoch (Lightning calls
    set_epoch). With one process the shard is the whole dataset."""

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)


def make_loader(
    inputs,
    labels,
    batch_size,
    shuffle,
    seed=0,
    pin_memory=False,
    device=None,
    rank=0,
    world_size=1,
    flipped=None,
):
    """Batches of in-memory tensors; with `device`, the tensors move there once, up front."""
    if flipped is not None:
        flipped = torch.as_tensor(flipped).to(device)
    dataset = _Batches(
        torch.as_tensor(inputs).to(device), torch.as_tensor(labels).to(device), flipped
    )
    shard = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    sampler = _ShardBatches(shard, batch_size, drop_last=False)
    return DataLoader(dataset, sampler=sampler, batch_size=None, pin_memory=pin_memory)


class InMemoryData(pl.LightningDataModule):
    """Train and val tensors; loaders are made once the processes exist, so that under DDP each
    rank takes its own shard."""

    def __init__(self, train, val, batch_size, seed, pin_memory, device):
        """`train` is (inputs, labels) or (inputs, labels, flipped inputs)."""
        super().__init__()
        self.train, self.val = train, val
        self.options = {"batch_size": batch_size, "pin_memory": pin_memory, "device": device}
        self.seed = seed
        self.loaders = {}

    def _loader(self, split, shuffle):
        # Each loader is made once: a per-batch lr schedule has Lightning count the train batches
        # before fitting, and a second loader would copy the tensors to the device again.
        if split not in self.loaders:
            self.loaders[split] = self._make_loader(getattr(self, split), shuffle)
        return self.loaders[split]

    def _make_loader(self, split, shuffle):
        inputs, labels, *flipped = split
        return make_loader(
            inputs,
            labels,
            flipped=flipped[0] if flipped else None,
            shuffle=shuffle,
            seed=self.seed,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            **self.options,
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)


def param_groups(name, section, net):
    """Optimizer groups for layer-wise lr decay: the head at lr, each trainable backbone block
    below it at lr * lr_decay**depth (depth 1 = the top block). None: one group at lr."""
    if uses_features(section) or isinstance(section, MlpParams) or section.lr_decay == 1:
        return None
    extractor, head = net
    groups = [{"params": _trainable(head), "lr_scale": 1.0}]
    blocks = backbone_spec(name).body_blocks(extractor[1])
    for depth, block in enumerate(reversed(blocks), start=1):
        if trainable := _trainable(block):
            groups.append({"params": trainable, "lr_scale": section.lr_decay**depth})
    # Parameters outside the blocks (a ViT's class token) train at the lowest rate.
    grouped = {id(p) for group in groups for p in group["params"]}
    if rest := [p for p in _trainable(extractor) if id(p) not in grouped]:
        groups.append({"params": rest, "lr_scale": groups[-1]["lr_scale"]})
    return groups


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def _flipped_features(name):
    path = layout.features_file(name, layout.FLIPPED_TRAIN)
    if not path.exists():
        raise UserError(
            f"{name}.train.hflip is true but {path} is missing: set the shared train.hflip: true "
            f"so that featurize_{name} caches the mirrored train images' features"
        )
    return np.load(path)


def trains_on_gpu(train):
    """Whether Lightning will put this training on CUDA (accelerator auto or gpu, and a GPU)."""
    return torch.cuda.is_available() and train.accelerator != "cpu"


def data_device(train, nbytes):
    """Where the training tensors live: "cuda" when one GPU trains and they take under a quarter
    of its free memory (batches are then gathered there, with no host-to-device copy per step),
    else None (host memory)."""
    one_gpu = trains_on_gpu(train) and train.devices == 1 and train.num_nodes == 1
    if one_gpu and nbytes < torch.cuda.mem_get_info()[0] / 4:
        return "cuda"
    return None


def resolve_precision(train):
    if train.precision != "auto":
        return train.precision
    return "bf16-mixed" if trains_on_gpu(train) and torch.cuda.is_bf16_supported() else "32-true"


def check_accelerator(train):
    if train.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            "train.accelerator = gpu, but no CUDA device is visible; set it to auto or cpu"
        )


def train_model(name, params, callbacks=()):
    """Fit model `name`; write its model file, metrics and history. Returns the metrics.

    Checkpoints go to checkpoints/<name> while it trains; with train.resume, a run of the same
    configuration on the same inputs that was interrupted continues from its last epoch.
    `callbacks`: extra Lightning callbacks.
    """
    section = params.model(name)
    train = section.train
    check_accelerator(train)
    enable_fast_cuda()
    pl.seed_everything(params.seed, workers=True)
    train_x, train_data = load_inputs(name, section, "train")
    val_x, val_data = load_inputs(name, section, "val")
    train_y, val_y, classes = train_data.labels, val_data.labels, train_data.classes
    if train.batch_size > len(train_y):
        raise UserError(
            f"{name}.train.batch_size = {train.batch_size} is larger than the train split "
            f"({len(train_y)} images); lower it or raise data.train_size"
        )
    features = uses_features(section)
    feature_meta = json.loads(layout.features_meta(name).read_text()) if features else {}
    stats = data_stats(train_data.images)
    net = build_net(name, section, len(classes), stats, feature_meta.get("feature_dim"))
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
        train_split += (_flipped_features(name),)
    device = data_device(train, sum(x.nbytes for x in (*train_split, val_x)))
    pin = device is None and trains_on_gpu(train)  # host tensors bound for a GPU
    data = InMemoryData(train_split, (val_x, val_y), train.batch_size, params.seed, pin, device)

    run_key = _run_key(section, params.seed, (*train_split, val_x, val_y))
    checkpoints, resume_from = _checkpoints(name, run_key, train.resume)
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
    logs = sorted(checkpoints.glob("logs/version_*/metrics.csv"))
    live = LiveProgress(name, _epoch_history(logs) if resume_from and logs else None)
    trainer = pl.Trainer(
        max_epochs=train.max_epochs,
        accelerator=train.accelerator,
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=train.strategy,
        use_distributed_sampler=False,  # InMemoryData shards by rank itself
        precision=resolve_precision(train),
        deterministic=train.deterministic,
        callbacks=[best, stop, live, *callbacks],
        # One log folder per attempt: Lightning's CSV logger empties its folder when it starts.
        logger=CSVLogger(checkpoints, name="logs"),
        default_root_dir=checkpoints,
        enable_model_summary=False,
        log_every_n_steps=1,  # metrics are logged per epoch; this only silences a hint
    )
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
    history = _epoch_history(sorted(checkpoints.glob("logs/version_*/metrics.csv")))
    if history["val_loss"].isna().all():
        raise UserError(f"{name}: val_loss was never finite; lower {name}.train.lr")
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])

    config = {
        "name": name,
        "section": dataclasses.asdict(section),
        "classes": list(classes),
        "data": stats,
        "feature_dim": feature_meta.get("feature_dim"),
        "seed": params.seed,
    }
    best_row = history.loc[history["val_loss"].idxmin()]
    trainable = count_params(net, trainable_only=True)
    metrics = {
        "best_val_loss": float(history["val_loss"].min()),
        "best_val_accuracy": float(history["val_acc"].max()),
        "epochs": len(history),
        "best_epoch": int(best_row["epoch"]),
        "train_seconds": round(seconds, 2),
        "resumed": resume_from is not None,
        "trainable_params": trainable,
        "total_params": count_params(net) + feature_meta.get("backbone_params", 0),
        "lr": train.lr,
        "optimizer": train.optimizer,
        "batch_size": train.batch_size,
        "precision": resolve_precision(train),
        "device": _device_name(trainer),
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "lightning": pl.__version__,
        },
    }
    # Model, history and metrics as one set: every file is written before any is renamed into
    # place. torch.save goes through memory first: writing to a full disk then raises an OSError
    # (one line), not the C++ stream error torch.save to a file would.
    model_bytes = io.BytesIO()
    torch.save({"state_dict": module.net.state_dict(), "config": config}, model_bytes)
    outputs = (layout.model_file(name), layout.history_file(name), layout.train_metrics(name))
    with atomic_paths(*outputs) as (model_tmp, history_tmp, metrics_tmp):
        model_tmp.write_bytes(model_bytes.getvalue())
        history.to_csv(history_tmp, index=False)
        metrics_tmp.write_text(json_text(metrics))
    live.finish(best_row, len(history), seconds)
    shutil.rmtree(checkpoints)  # finished: nothing left to resume
    return metrics


def _run_key(section, seed, arrays):
    """Fingerprint of everything a run's result depends on, but train.resume itself."""
    config = dataclasses.asdict(section)
    config["train"].pop("resume")
    digest = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _checkpoints(name, run_key, resume):
    """(checkpoint folder, checkpoint to resume from or None). A fresh run empties the folder."""
    folder = layout.checkpoint_dir(name)
    key_file, last = folder / "run_key", folder / "last.ckpt"
    same_run = resume and last.is_file() and _read_key(key_file) == run_key
    if same_run and _resumable(last):
        print(f"{name}: resuming from {last}", file=sys.stderr)
        return folder, str(last)
    if rank_zero_only.rank != 0:
        # A DDP process that Lightning started: the launching process (rank 0) has prepared the
        # folder already, and emptying it now would delete what rank 0 writes there.
        return folder, None
    if same_run:
        print(f"{name}: {last} is damaged or not a checkpoint; starting over", file=sys.stderr)
    elif resume and last.exists():
        print(f"{name}: {last} is from another configuration; starting over", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    key_file.write_text(run_key)
    return folder, None


def _read_key(path):
    """The run key saved beside a checkpoint (64 hex digits; at most 100 bytes are read)."""
    try:
        with open(path, "rb") as file:
            return file.read(100).decode("ascii", errors="replace")
    except OSError:
        return None


def _resumable(path):
    """Whether a checkpoint loads whole as tensors and plain data (weights_only: nothing in a
    tampered file runs) and holds what a resumed run needs."""
    try:
        state = load_tensors(path)
    except UnreadableTensors:  # damaged, truncated or tampered
        return False
    return isinstance(state, dict) and {"state_dict", "rng_state", "loops"} <= state.keys()


def _epoch_history(csv_paths):
    """Lightning's CSV logs (train and val rows apart; one file per attempt, a resumed run's
    last) -> one row per epoch, 1-based."""
    log = pd.concat([pd.read_csv(path) for path in csv_paths], ignore_index=True)
    columns = {
        "train/loss": "train_loss",
        "train/acc": "train_acc",
        "val/loss": "val_loss",
        "val/acc": "val_acc",
    }
    history = log.groupby("epoch")[list(columns)].last().rename(columns=columns).reset_index()
    history["epoch"] += 1
    return history


def _device_name(trainer):
    device = trainer.strategy.root_device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
