"""Stage evaluate: every trained model on the test split."""

from transfer_study.core.config import load_params
from transfer_study.core.stage import exit_on_user_error
from transfer_study.evaluate import evaluate_models


@exit_on_user_error
def main():
    params = load_params()
    evaluate_models(params.models, hflip=params.evaluate.hflip)


if __name__ == "__main__":
    main()
