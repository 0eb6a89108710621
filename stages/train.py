"""Stage train_<model>: fit the MLP, a head on cached features, or a fine-tuned backbone."""

import sys

from transfer_study.core.config import load_params
from transfer_study.core.markers import skip_training
from transfer_study.core.pipeline import stage_model
from transfer_study.core.stage import exit_on_user_error


@exit_on_user_error
def main(argv):
    params = load_params()
    name = stage_model(argv, params, "train")
    if name not in params.models:
        skip_training(name)  # markers, without importing torch
        return
    from transfer_study.train.fit import train_model  # torch and Lightning: only to train

    train_model(name, params)


if __name__ == "__main__":
    main(sys.argv[1:])
