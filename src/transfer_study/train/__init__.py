"""Training: the LightningModule, its loaders, optimizers, live progress, fit and resume."""
