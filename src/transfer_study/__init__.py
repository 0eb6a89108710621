"""CIFAR-10 transfer-learning study: an MLP on pixels against frozen ImageNet backbones."""
