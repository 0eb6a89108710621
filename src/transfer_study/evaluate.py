"""Every trained model on the test split: accuracy and loss, and each test image's prediction."""

import math
import shutil

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from transfer_study.core import paths
from transfer_study.core.atomic import atomic_path, write_json
from transfer_study.core.stage import UserError
from transfer_study.inference import predict_logits
from transfer_study.nn.build import load_inputs, load_trained, read_cache, saved_inputs

PREDICTION_COLUMNS = ["actual", "predicted", "confidence"]  # predictions/<model>.csv


def score(logits, labels, classes):
    """(metrics dict, per-image predictions table) from test logits."""
    labels_t = torch.as_tensor(labels)
    probabilities = logits.softmax(dim=1)
    predicted = probabilities.argmax(dim=1).numpy()
    metrics = {
        "test_accuracy": round(float((predicted == labels).mean()), 6),
        "test_loss": round(float(F.cross_entropy(logits, labels_t)), 6),
    }
    names = np.array(classes)
    confidence = probabilities.max(dim=1).values.numpy().round(4)
    columns = (names[labels], names[predicted], confidence)
    table = pd.DataFrame(dict(zip(PREDICTION_COLUMNS, columns)))
    return metrics, table


def mirrored_inputs(name, cached, inputs):
    """The test inputs of the mirrored images: their cached features or activations (`cached`,
    what the model learned from), else the images flipped left-right."""
    if cached is None:
        return np.ascontiguousarray(inputs[..., ::-1])
    path = paths.features_file(name, paths.FLIPPED_TEST)
    if not path.exists():
        raise UserError(
            f"evaluate.hflip is true but {path} is missing: rerun featurize_{name} "
            f"(dvc repro featurize_{name}), which caches it"
        )
    return read_cache(name, paths.FLIPPED_TEST, len(inputs))


def logits_on_test(net, name, cached, inputs, hflip):
    """The model's test logits; with `hflip`, the log of the mean of the image's and its mirror
    image's class probabilities (so that softmax gives that mean back), computed in log space:
    a probability below float32's smallest would otherwise make the test loss infinite."""
    logits = predict_logits(net, inputs)
    if not hflip:
        return logits
    mirrored = predict_logits(net, mirrored_inputs(name, cached, inputs))
    both = torch.stack([logits.log_softmax(1), mirrored.log_softmax(1)])
    return torch.logsumexp(both, dim=0) - math.log(2)


def evaluate_models(models, hflip=False):
    """Score each trained model on the test split: the headline figures in evaluate.json, each
    test image's prediction in predictions/<model>.csv (for the models in the study only).
    With `hflip`, each prediction averages the image's and its mirror image's.
    Every model is scored before anything is written, so a bad model file changes nothing."""
    results, tables = {}, {}
    for name in models:
        net, section, config = load_trained(paths.model_file(name))
        cached = saved_inputs(section, config)
        inputs, test = load_inputs(name, cached, "test")
        logits = logits_on_test(net, name, cached, inputs, hflip)
        results[name], tables[name] = score(logits, test.labels, test.classes)
        loss = results[name]["test_loss"]
        if not math.isfinite(loss):  # finite inputs, yet the model's outputs overflow
            raise UserError(
                f"{name}: test_loss is {loss}, its outputs on the test split are not finite; "
                f"retrain it with a lower {name}.train.lr (dvc repro train_{name})"
            )
    shutil.rmtree(paths.PREDICTIONS_DIR, ignore_errors=True)  # no left-out model's old table
    for name, table in tables.items():
        with atomic_path(paths.predictions_file(name)) as tmp:
            table.to_csv(tmp, index=False)
    write_json(paths.EVALUATE_METRICS, results)
    return results
