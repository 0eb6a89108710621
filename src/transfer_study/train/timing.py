"""The study timer's view of training (core.timing): when the first batch starts, images seen."""

import pytorch_lightning as pl

from transfer_study.core import timing


class BatchTiming(pl.Callback):
    """Marks the first batch (Lightning's sanity check's, a val batch, comes first) and counts
    the train images, every rank's shard, so that the module knows nothing of benchmarks."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        timing.work_starts()

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        timing.work_starts()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        timing.count_images(len(batch[1]) * trainer.world_size)
