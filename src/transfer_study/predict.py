"""Top classes of image files under a trained model (python -m transfer_study predict)."""

import numpy as np
import torch

from . import layout
from .errors import UserError
from .evaluation import predict_logits
from .features import prepare_extractor
from .hardware import default_device, featurize_dtype
from .markers import is_skipped
from .models import feature_extractor
from .networks import load_trained
from .params import uses_features
from .sources import UNREADABLE_IMAGE, read_image


def load_image(path, shape):
    """uint8 C x H x W pixels of an image file, as the model's training images were stored:
    RGB or grayscale by C, resized to H x W (a photo becomes what the model was trained on)."""
    try:
        return read_image(path, shape)
    except UNREADABLE_IMAGE as error:
        raise UserError(f"cannot read image {path} ({error})") from None


@torch.inference_mode()
def predict_files(name, paths, top=3):
    """[(path, [(class, probability), ...top]) ...] for image files, with models/<name>.pt."""
    path = layout.model_file(name)
    if not path.exists():
        raise UserError(f"{path} does not exist: train it first (dvc repro train_{name})")
    if is_skipped(path):
        raise UserError(f"{name} was left out of `models` in the last run: no trained model")
    net, section, config = load_trained(path)
    inputs = torch.from_numpy(np.stack([load_image(p, config["data"]["shape"]) for p in paths]))
    device = default_device()
    if uses_features(section):  # the head was trained on the frozen backbone's features
        extractor = feature_extractor(name, section.weights, section.image_size)
        extractor = prepare_extractor(extractor, device)
        dtype = featurize_dtype(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            inputs = extractor(inputs.to(device)).to(torch.float16)
    probabilities = predict_logits(net, inputs, device).softmax(dim=1)
    best = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
    classes = config["classes"]
    return [
        (str(p), [(classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())])
        for p, values, indices in zip(paths, best.values, best.indices)
    ]
