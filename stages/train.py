"""Stage train_<model>: fit the MLP, a head on cached features, or a fine-tuned backbone."""

import sys

from transfer_study.errors import exit_on_user_error
from transfer_study.params import load_params
from transfer_study.training import skip_training, train_model


@exit_on_user_error
def main(name):
    params = load_params()
    if name in params.models:
        train_model(name, params)
    else:
        skip_training(name)


if __name__ == "__main__":
    main(sys.argv[1])
