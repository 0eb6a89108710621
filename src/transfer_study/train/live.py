"""Live progress with DVCLive: each epoch's losses and accuracies, for dvc exp show and VS Code."""

import math
import sys
import time

import pytorch_lightning as pl
from dvclive import Live
from pytorch_lightning.callbacks import TQDMProgressBar
from tqdm import tqdm

from transfer_study.core import paths
from transfer_study.core.atomic import Rewritten, write_json
from transfer_study.core.progress import bars
from transfer_study.train.history import COLUMNS, kept_epoch


def progress_bar_callbacks():
    """Lightning's progress bar, as core.progress decides: its default (Rich) on a terminal, a
    StreamedBar when bars are wanted elsewhere (a notebook streaming a stage's output renders
    carriage returns; Rich draws nothing off a terminal), none for lines. Returns (the Trainer's
    enable_progress_bar, callbacks)."""
    if not bars():
        return False, []
    if sys.stdout.isatty():
        return True, []
    return True, [StreamedBar()]


class StreamedBar(TQDMProgressBar):
    """Lightning's tqdm bar for output that a notebook streams: the train bar alone (nested
    bars need cursor moves that a notebook's output lacks), redrawn at most every REDRAW_S
    seconds (Lightning redraws it every batch: hundreds of times a second on cached features)."""

    REDRAW_S = 0.5

    def __init__(self):
        super().__init__()
        self.drawn = 0.0

    def init_sanity_tqdm(self):
        return tqdm(disable=True)

    def init_validation_tqdm(self):
        return tqdm(disable=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.monotonic()
        if now - self.drawn >= self.REDRAW_S or batch_idx + 1 == self.total_train_batches:
            self.drawn = now
            super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)


class LiveProgress(pl.Callback):
    """Logs each epoch to dvclive/<model>/ (its step is the epoch, 1-based): the curves by epoch,
    and a summary (metrics.json) that DVC reads while the stage runs. `finish` then writes the
    summary of the run: the values of the epoch whose weights the model keeps. Where progress
    shows as lines (a log file, CI, a batch job: core.progress), each epoch also gets one line
    on stderr.

    The previous run's folder is set aside while training writes in its place (where dvc exp
    show and VS Code look): `previous`, the context manager around train_model's run, puts it
    back if the run fails, or drops it once the outputs are written.

    `earlier`: the history of an interrupted run being resumed, logged again first, since DVC
    empties the folder before the stage runs.
    """

    def __init__(self, name, earlier=None):
        self.name = name
        self.earlier = earlier
        self.previous = Rewritten(paths.live_dir(name))
        self.live = None
        self.epoch_start = None

    def on_train_start(self, trainer, module):
        if not trainer.is_global_zero:  # one writer under DDP
            return
        self.previous.begin()
        try:
            # dvcyaml=False: dvc.yaml declares this folder itself and must never be rewritten.
            folder = str(paths.live_dir(self.name))
            self.live = Live(folder, dvcyaml=False, save_dvc_exp=False, report=None)
        except Exception as error:  # DVCLive is a view: training goes on without it
            print(f"{self.name}: no live progress ({error})", file=sys.stderr)
            return
        if self.earlier is not None:
            done = self.earlier[self.earlier["epoch"] <= trainer.current_epoch]
            for _, row in done.iterrows():
                self._log(int(row["epoch"]), {key: row[column] for key, column in COLUMNS.items()})

    def on_train_epoch_start(self, trainer, module):
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        # Lightning validates before this hook, so both splits' epoch metrics are in.
        metrics = trainer.callback_metrics
        values = {key: float(metrics[key]) for key in COLUMNS if key in metrics}
        if self.live is not None:
            self._log(trainer.current_epoch + 1, values)
        if trainer.is_global_zero and not bars():
            shown = ", ".join(
                f"{key} {value:.2%}" if key.endswith("acc") else f"{key} {value:.4f}"
                for key, value in values.items()
            )
            seconds = time.perf_counter() - self.epoch_start
            print(
                f"{self.name}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {shown} "
                f"({seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    def _log(self, epoch, values):
        self.live.step = epoch
        for key, value in values.items():
            # DVCLive writes a NaN into metrics.json as the string "nan", which dvc metrics
            # and exp show then hold as a metric: a diverged epoch's value is left out instead.
            if math.isfinite(value):
                self.live.log_metric(key, float(value))
        self.live.next_step()

    def finish(self, history, seconds):
        """The run's summary, of its epoch `history`. Written by this process in every case
        (ddp_spawn trains in another, and DVCLive may have failed to start)."""
        if self.live is not None:
            self.live.end()
        kept = kept_epoch(history)
        # Nested as DVCLive nests the "val/loss" it logs live: the same columns in dvc exp show.
        summary = {
            "step": int(kept["epoch"]),  # the kept epoch: its weights are the model's
            "val": {"loss": float(kept["val_loss"]), "acc": float(kept["val_acc"])},
            "epochs": len(history),
            "train_seconds": round(seconds, 2),
        }
        write_json(paths.live_summary(self.name), summary)
