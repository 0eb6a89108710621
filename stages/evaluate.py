"""Stage evaluate: every trained model on the test split."""

from transfer_study.errors import exit_on_user_error
from transfer_study.evaluation import evaluate_models
from transfer_study.params import load_params


@exit_on_user_error
def main():
    params = load_params()
    evaluate_models(params.models, hflip=params.evaluate.hflip)


if __name__ == "__main__":
    main()
