"""One generic LightningModule: the MLP, a head on features, or a fine-tuned backbone."""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms.v2 import MixUp

from transfer_study.nn.layers import augment, frozen_modules
from transfer_study.train.optim import build_optimizer, build_scheduler, scheduled, trainable_params


class Classifier(pl.LightningModule):
    """Any network mapping a batch to class logits: shared step, per-split accuracy.

    `pixels`: the inputs are images, augmented on the device (train.hflip, train.crop).
    train.mixup > 0: every train batch, pixels, features or activations, is mixed up (its
    targets become class shares).
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
        self.frozen = frozen_modules(net)
        # torchvision's MixUp blends each row with the next one (the loader shuffles) at one
        # Beta(alpha, alpha) weight a batch, and the one-hot targets with them.
        self.mixup = MixUp(alpha=train.mixup, num_classes=num_classes) if train.mixup else None

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
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
        if self.mixup is not None and self.trainer.training:
            # As 1 x 1 images of many channels, since MixUp takes image batches only; a
            # Preprocess layer takes the float pixels as it takes uint8 ones.
            mixed, labels = self.mixup(inputs.float().reshape(len(inputs), -1, 1, 1), labels)
            inputs = mixed.reshape(inputs.shape)
        return inputs, labels

    def _step(self, batch, split):
        inputs, labels = batch
        logits = self.net(inputs).float()
        # Smoothed targets in training only: val/loss stays the plain cross-entropy that early
        # stopping and the kept epoch are judged by.
        smoothing = self.train_params.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        accuracy = getattr(self, f"{split}_acc")
        # A mixed-up image counts as the class of its larger share.
        accuracy(logits, labels if labels.ndim == 1 else labels.argmax(1))
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

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        lr = self.train_params.lr
        groups = self.param_groups or [{"params": trainable_params(self), "lr_scale": 1.0}]
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
