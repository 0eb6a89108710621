"""Training in steps (fit.train_model): inputs, network, trainer, outputs; resume, progress."""
