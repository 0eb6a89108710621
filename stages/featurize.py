"""Stage featurize_<model>: run the backbone's frozen part once over every split, cache its
output (a model left out writes markers only, without torch; one fine-tuned from pixels, markers
only)."""

import sys

from transfer_study.core.config import load_params
from transfer_study.core.markers import skip_featurize
from transfer_study.core.pipeline import stage_model
from transfer_study.core.stage import exit_on_user_error


@exit_on_user_error
def main(argv):
    params = load_params()
    name = stage_model(argv, params, "featurize")
    if name not in params.models:
        skip_featurize(name)
        return
    from transfer_study.featurize import featurize_model  # torch: only for a model in the study
    from transfer_study.nn.backbones import cached_inputs

    section, crop = params.model(name), params.train.crop
    if cached_inputs(name, section, crop) is None:
        skip_featurize(name)
        return

    featurize_model(name, section, hflip=params.train.hflip, crop=crop)


if __name__ == "__main__":
    main(sys.argv[1:])
