"""The network a model trains, checked to fit in memory, inside the generic Classifier."""

import torch

from transfer_study.core.config import MlpParams
from transfer_study.nn.build import build_net, check_trainable
from transfer_study.nn.device import memory_bytes
from transfer_study.train.loaders import training_device
from transfer_study.train.module import Classifier
from transfer_study.train.optim import param_groups


def build_classifier(name, section, inputs):
    """The Classifier of model `name` (its `section`) for TrainingInputs `inputs`."""
    train, num_classes = section.train, len(inputs.classes)
    memory = memory_bytes(training_device(train))
    check_trainable(name, section, num_classes, inputs.stats, inputs.feature_dim, memory)
    net = build_net(
        name,
        section,
        num_classes,
        inputs.stats,
        inputs.feature_dim,
        activation_shape=inputs.activation_shape,
    )
    if inputs.pixels and not isinstance(section, MlpParams):
        # A backbone fine-tuned from pixels: convolutions in NHWC, the layout GPU tensor cores
        # (and oneDNN on CPUs) run fastest; its 2-D weights and the saved values are unchanged.
        net = net.to(memory_format=torch.channels_last)
    if train.compile:
        net.compile()  # in place: the state_dict keeps its keys; compiles at the first batch
    groups = param_groups(name, section, net)
    return Classifier(net, train, num_classes, pixels=inputs.pixels, param_groups=groups)
