"""A Lightning callback that stops training at the next batch once a SIGINT or SIGTERM came."""

import pytorch_lightning as pl

from transfer_study.core.stage import stop_if_signalled


class StopOnSignal(pl.Callback):
    """Checks at every step of fit (set-up, each train and val batch, epoch ends, checkpoint
    writes): a stop signal that was swallowed on its way out still ends the stage."""

    def setup(self, trainer, module, stage):
        stop_if_signalled()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        stop_if_signalled()

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        stop_if_signalled()

    def on_train_epoch_end(self, trainer, module):
        stop_if_signalled()

    def on_validation_epoch_end(self, trainer, module):
        stop_if_signalled()

    def on_save_checkpoint(self, trainer, module, checkpoint):
        stop_if_signalled()
