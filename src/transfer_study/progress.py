"""Live progress with DVCLive: each epoch's losses and accuracies, for dvc exp show and VS Code."""

import sys

import pytorch_lightning as pl
from dvclive import Live

from . import layout

LOGGED = ("train/loss", "train/acc", "val/loss", "val/acc")


class LiveProgress(pl.Callback):
    """Logs each epoch to dvclive/<model>/ (its step is the epoch, 1-based): the curves by epoch,
    and a summary (metrics.json) that DVC reads while the stage runs. `finish` then leaves in the
    summary the best epoch's values, the weights that early stopping keeps."""

    def __init__(self, name):
        self.folder = layout.live_dir(name)
        self.live = None

    def on_train_start(self, trainer, module):
        if not trainer.is_global_zero:  # one writer under DDP
            return
        try:
            # dvcyaml=False: dvc.yaml declares this folder itself and must never be rewritten.
            self.live = Live(str(self.folder), dvcyaml=False, save_dvc_exp=False, report=None)
        except Exception as error:  # DVCLive is a view: training goes on without it
            print(f"no live progress in {self.folder} ({error})", file=sys.stderr)

    def on_train_epoch_end(self, trainer, module):
        # Lightning validates before this hook, so both splits' epoch metrics are in.
        if self.live is None or trainer.sanity_checking:
            return
        self.live.step = trainer.current_epoch + 1
        for key in LOGGED:
            if key in trainer.callback_metrics:
                self.live.log_metric(key, float(trainer.callback_metrics[key]))
        self.live.next_step()

    def finish(self, best, epochs, seconds):
        """Summary of the finished run: `best` (a history row) is the kept epoch."""
        if self.live is None:
            return
        # Nested as DVCLive nests the "val/loss" it logs live: the same columns in dvc exp show.
        self.live.summary = {
            "step": int(best["epoch"]),  # the best epoch: its weights are the model's
            "val": {"loss": float(best["val_loss"]), "acc": float(best["val_acc"])},
            "epochs": int(epochs),
            "train_seconds": round(seconds, 2),
        }
        self.live.end()
