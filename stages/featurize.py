"""Stage featurize_<model>: run the frozen backbone once over every split, cache its features
(a model left out, or fine-tuned from pixels, writes markers only, without importing torch)."""

import sys

from transfer_study.core.config import load_params, stage_model, uses_features
from transfer_study.core.markers import skip_featurize
from transfer_study.core.stage import exit_on_user_error


@exit_on_user_error
def main(argv):
    params = load_params()
    name = stage_model(argv, params, "featurize")
    if name not in params.models or not uses_features(params.model(name)):
        skip_featurize(name)
        return
    from transfer_study.featurize import featurize_model  # torch: only for a backbone pass

    featurize_model(name, params.model(name), hflip=params.train.hflip)


if __name__ == "__main__":
    main(sys.argv[1:])
