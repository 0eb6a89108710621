"""Stage featurize_<model>: run the frozen backbone once over every split, cache its features
(a model left out, or fine-tuned from pixels, writes markers only)."""

import sys

from transfer_study.errors import exit_on_user_error
from transfer_study.features import featurize_model, skip_featurize
from transfer_study.params import load_params, uses_features


@exit_on_user_error
def main(name):
    params = load_params()
    if name in params.models and uses_features(params.model(name)):
        featurize_model(name, params.model(name), hflip=params.train.hflip)
    else:
        skip_featurize(name)


if __name__ == "__main__":
    main(sys.argv[1])
