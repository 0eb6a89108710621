"""train_model: the fit shared by the MLP, the heads and fine-tuning, step by step."""

import pytorch_lightning as pl

from transfer_study.core.progress import bars
from transfer_study.nn.device import enable_fast_cuda
from transfer_study.train.head_first import train_head_first, trains_head_first
from transfer_study.train.history import logged_history
from transfer_study.train.inputs import load_training_inputs
from transfer_study.train.live import LiveProgress
from transfer_study.train.loaders import in_memory_data
from transfer_study.train.network import build_classifier
from transfer_study.train.outputs import (
    finished_history,
    model_config,
    restore_best,
    training_metrics,
    write_outputs,
)
from transfer_study.train.resume import checkpoint_folder, kept_while_resumable, run_key_of
from transfer_study.train.trainer import (
    build_trainer,
    check_accelerator,
    device_name,
    fit,
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
    inputs = load_training_inputs(name, section, params.seed, params.train.crop)
    module = build_classifier(name, section, inputs)
    data = in_memory_data(inputs, train, params.seed)

    run_key = run_key_of(section, params.seed, (*inputs.train, *inputs.val))
    checkpoints, resume_from, start_over = checkpoint_folder(name, run_key, train.resume)
    head_seconds = 0.0  # a resumed run's checkpoint holds its head already
    if trains_head_first(section) and resume_from is None:
        head_seconds = train_head_first(
            name, module.net, inputs, train, section.head_epochs, section.head_lr, params.seed
        )
    live = LiveProgress(name, logged_history(checkpoints) if resume_from else None)
    trainer, best = build_trainer(train, checkpoints, start_over, [live, *callbacks])
    # A failed run leaves the previous run's outputs as they were: the model, history and
    # metrics are renamed into place last, together; DVCLive's folder is put back.
    with live.previous, kept_while_resumable(checkpoints, trainer):
        seconds = fit(trainer, module, data, resume_from, start_over)
        if not trainer.is_global_zero:  # rank 0 writes the outputs
            return None
        history = finished_history(name, checkpoints)
        restore_best(module, name, best.best_model_path)
        resumed = resume_from is not None
        metrics = training_metrics(
            train, inputs, module.net, history, seconds, resumed, device_name(trainer)
        )
        metrics["head_first_seconds"] = round(head_seconds, 2)  # not in train_seconds
        live.finish(history, seconds)
        config = model_config(name, section, params.seed, inputs)
        write_outputs(name, module.net, config, history, metrics)
        return metrics
