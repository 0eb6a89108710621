"""Top classes of image files and folders under a trained model (the predict command)."""

from pathlib import Path

import numpy as np
import torch

from transfer_study.core import paths
from transfer_study.data.readers import IMAGE_SUFFIXES, UNREADABLE_IMAGE, images_below, read_image
from transfer_study.evaluate import predict_logits
from transfer_study.featurize import frozen_part, prepare_extractor
from transfer_study.nn.build import load_trained, saved_inputs
from transfer_study.nn.device import default_device, featurize_dtype

BATCH_SIZE = 64  # images decoded and classified together


def image_files(targets):
    """(files to classify, [(path, why it is skipped)]): each path as given, a folder as the
    image files below it, listed as a folder dataset's are (readers.images_below)."""
    files, problems = [], []
    for path in map(Path, targets):
        if path.is_dir():
            found, linked_folders = images_below(path)
            files += found
            problems += [(linked, "a link to a folder, not followed") for linked in linked_folders]
            if not found:
                problems.append((path, f"a folder without images ({', '.join(IMAGE_SUFFIXES)})"))
        elif path.exists():  # a file, or something that is not one: read_image names it
            files.append(path)
        else:
            problems.append((path, "no such file or folder"))
    return files, problems


def load_classifier(name):
    """(uint8 N x C x H x W images -> class probabilities, (C, H, W) the images are read at,
    class names) of models/<name>.pt; a model that learned from cached features or activations
    gets them from the backbone's frozen part."""
    net, section, config = load_trained(paths.model_file(name))
    device = default_device()
    extractor, cached = None, saved_inputs(section, config)
    if cached is not None:
        extractor = prepare_extractor(frozen_part(name, section, cached), device)

    @torch.inference_mode()
    def classify(images):
        inputs = torch.from_numpy(images)
        if extractor is not None:
            dtype = featurize_dtype(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                inputs = extractor(inputs.to(device)).flatten(1).to(torch.float16)
        return predict_logits(net, inputs, device).softmax(dim=1)

    return classify, tuple(config["data"]["shape"]), config["classes"]


def predict_files(name, targets, top=3, batch_size=BATCH_SIZE):
    """Yield (path, [(class, probability), ...top] or None, None or why it is unreadable) for
    each file, in order, a batch at a time: each image is read as the model's training images
    were stored (RGB or grayscale, resized), so a photo becomes what the model was trained on."""
    classify, shape, classes = load_classifier(name)
    for first in range(0, len(targets), batch_size):
        results, images = [], []
        for path in targets[first : first + batch_size]:
            try:
                images.append(read_image(path, shape))
                results.append([path, None, None])
            except UNREADABLE_IMAGE as error:
                results.append([path, None, str(error) or type(error).__name__])
        if images:
            probabilities = classify(np.stack(images))
            best = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
            readable = (r for r in results if r[2] is None)
            for result, values, indices in zip(readable, best.values, best.indices):
                result[1] = [
                    (classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())
                ]
        yield from map(tuple, results)
