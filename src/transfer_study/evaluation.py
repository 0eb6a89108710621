"""Every trained model on the test split: accuracy, loss, per-class accuracy, confusion."""

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import layout
from .atomic import atomic_path, write_json
from .hardware import autocast_dtype, default_device
from .networks import load_inputs, load_trained

BATCH_SIZE = 256  # images or feature rows per forward pass
PREDICTION_COLUMNS = ["actual", "predicted", "confidence"]  # plots/confusion/<model>.csv


@torch.inference_mode()
def predict_logits(net, inputs, device=None, batch_size=BATCH_SIZE):
    """float32 logits (N x classes) for inputs (uint8 images or fp16 features), batched."""
    device = device or default_device()
    net = net.to(device).eval()
    dtype = autocast_dtype(device)
    chunks = []
    for first in range(0, len(inputs), batch_size):
        batch = torch.as_tensor(inputs[first : first + batch_size]).to(device)
        if batch.dtype == torch.float16:
            batch = batch.float()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            chunks.append(net(batch).float().cpu())
    return torch.cat(chunks)


def score(logits, labels, classes):
    """(metrics dict, per-image predictions table) from test logits."""
    labels_t = torch.as_tensor(labels)
    probabilities = logits.softmax(dim=1)
    predicted = probabilities.argmax(dim=1).numpy()
    k = len(classes)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    metrics = {
        "test_accuracy": round(float((predicted == labels).mean()), 6),
        "test_loss": round(float(F.cross_entropy(logits, labels_t)), 6),
        "per_class_accuracy": {c: round(float(a), 6) for c, a in zip(classes, per_class)},
    }
    names = np.array(classes)
    confidence = probabilities.max(dim=1).values.numpy().round(4)
    columns = (names[labels], names[predicted], confidence)
    table = pd.DataFrame(dict(zip(PREDICTION_COLUMNS, columns)))
    return metrics, table


def evaluate_models(models, declared=()):
    """Score each trained model on the test split; write evaluate.json and confusion tables
    (the `declared` models left out get empty tables: DVC wants every declared output)."""
    for name in set(declared) - set(models):
        with atomic_path(layout.confusion_file(name)) as tmp:
            pd.DataFrame(columns=PREDICTION_COLUMNS).to_csv(tmp, index=False)
    results = {}
    for name in models:
        net, section, _ = load_trained(layout.model_file(name))
        inputs, test = load_inputs(name, section, "test")
        metrics, predictions = score(predict_logits(net, inputs), test.labels, test.classes)
        with atomic_path(layout.confusion_file(name)) as tmp:
            predictions.to_csv(tmp, index=False)
        results[name] = metrics
    write_json(layout.METRICS_DIR / "evaluate.json", results)
    return results
