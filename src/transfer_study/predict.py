"""Top classes of image files and folders under a trained model (the predict command)."""

from pathlib import Path

import torch

from transfer_study.core import paths
from transfer_study.data.images import IMAGE_SUFFIXES, images_below
from transfer_study.inference import (
    frozen_outputs,
    frozen_part,
    predict_logits,
    prepare_extractor,
    read_images,
)
from transfer_study.nn.build import load_trained, saved_inputs
from transfer_study.nn.device import default_device, featurize_dtype

BATCH_SIZE = 64  # images decoded and classified together


def image_files(targets):
    """(files to classify, [(path, why it is skipped)]): each path as given, a folder as the
    image files below it, listed as a folder dataset's are (data.images.images_below)."""
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
            inputs = frozen_outputs(extractor, inputs.to(device), device, featurize_dtype(device))
        return predict_logits(net, inputs, device).softmax(dim=1)

    return classify, tuple(config["data"]["shape"]), config["classes"]


def predict_files(name, targets, top=3, batch_size=BATCH_SIZE):
    """Yield (path, [(class, probability), ...top] or None, None or why it is unreadable) for
    each file, in order, a batch at a time, each image read as the model's training images were
    stored (inference.read_images)."""
    classify, shape, classes = load_classifier(name)
    for first in range(0, len(targets), batch_size):
        batch = targets[first : first + batch_size]
        images, problems = read_images(batch, shape)
        ranked = iter(())
        if images is not None:
            probabilities = classify(images)
            best = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
            ranked = (
                [(classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]
                for values, indices in zip(best.values, best.indices)
            )
        for path, problem in zip(batch, problems):
            yield path, None if problem is not None else next(ranked), problem
