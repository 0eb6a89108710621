"""The learning-rate finder: Lightning's sweep of increasing learning rates over what a model
trains on (cached features or activations: seconds, no backbone pass), its loss curve and the
lr it suggests."""

import math
import tempfile
from dataclasses import dataclass

import pytorch_lightning as pl
from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
from pytorch_lightning.tuner import Tuner

from transfer_study.core.atomic import atomic_path
from transfer_study.core.stage import UserError
from transfer_study.experiments import flat_params
from transfer_study.train.inputs import load_training_inputs
from transfer_study.train.loaders import in_memory_data
from transfer_study.train.network import build_classifier
from transfer_study.train.trainer import check_accelerator, resolve_precision


@dataclass(frozen=True)
class LrSweep:
    lrs: list  # the lr of each step, increasing exponentially
    losses: list  # the train loss after each step, smoothed (Lightning's running average)
    suggested: float | None  # where the smoothed loss falls fastest; None: too few finite points


def sweep_lr(name, params, min_lr, max_lr, steps):
    """Train model `name` from its start for up to `steps` batches, its lr rising exponentially
    from `min_lr` to `max_lr`; the sweep stops early once the loss diverges (4x its best).
    Every optimizer group gets the same lr (Lightning's finder replaces the schedule, layer-wise
    lr decay included). Nothing is written: the weights are thrown away."""
    if name not in params.model_sections:
        raise UserError(f"unknown model {name!r} (valid: {', '.join(params.model_sections)})")
    if name not in params.models:
        raise UserError(
            f"{name} is not in the study: set models.{name}: true and run dvc repro, which "
            "makes what it trains on"
        )
    section = params.model(name)
    train = section.train
    check_accelerator(train)
    pl.seed_everything(params.seed, workers=True)
    inputs = load_training_inputs(name, section, params.seed, params.train.crop)
    module = build_classifier(name, section, inputs)
    data = in_memory_data(inputs, train, params.seed)
    # Enough epochs for `steps` batches (the loaders keep the last, smaller batch); the finder
    # sets the step limit itself.
    batches_per_epoch = max(1, len(inputs.train[1]) // inputs.batch_size)
    with tempfile.TemporaryDirectory() as folder:  # the finder's checkpoint of the start
        trainer = pl.Trainer(
            max_epochs=math.ceil(steps / batches_per_epoch),
            accelerator=train.accelerator,
            devices=1,
            precision=resolve_precision(train),
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=folder,
        )
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=data,
            min_lr=min_lr,
            max_lr=max_lr,
            num_training=steps,
            update_attr=False,
        )
    return LrSweep(
        finder.results["lr"], finder.results["loss"], finder.suggestion(skip_begin=SKIPPED_STEPS)
    )


# Steps left out of the curve, as Lightning's suggestion leaves them out: the running average
# of the loss starts biased low (about half the loss at the first step).
SKIPPED_STEPS = 10


def plot_sweep(sweep, name, path):
    """The loss against the lr (log scale) after its first SKIPPED_STEPS steps, the suggestion
    marked, as a PNG at `path`."""
    first = SKIPPED_STEPS if len(sweep.lrs) > SKIPPED_STEPS + 2 else 0
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(sweep.lrs[first:], sweep.losses[first:])
    if sweep.suggested is not None:
        index = sweep.lrs.index(sweep.suggested)
        axes.plot(sweep.suggested, sweep.losses[index], "o", color="red")
        axes.annotate(
            f"suggested {sweep.suggested:.2g}",
            (sweep.suggested, sweep.losses[index]),
            xytext=(8, -16),  # points: below and right of the marker, off the curve
            textcoords="offset points",
        )
    axes.set(xscale="log", xlabel="learning rate", ylabel="train loss (smoothed)")
    axes.set_title(f"{name}: lr finder")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def check_range(min_lr, max_lr):
    if not 0 < min_lr < max_lr < math.inf:
        raise UserError(f"--min-lr {min_lr:g} and --max-lr {max_lr:g}: need 0 < min < max < inf")


def suggested_override(name, lr, raw_params):
    """The -S argument that sets model `name`'s lr to `lr` (with DVC's ++ where params.yaml,
    read as `raw_params`, lacks the key: a model's train section may be empty)."""
    key = f"{name}.train.lr"
    return f"-S {'' if key in flat_params(raw_params) else '++'}{key}={lr:.3g}"
