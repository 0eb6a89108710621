"""Command line: python -m transfer_study predict --model NAME IMAGE..."""

import argparse

from .errors import exit_on_user_error
from .predict import predict_files


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m transfer_study")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict", help="top classes of image files under a trained model (run in the project)"
    )
    predict.add_argument("--model", required=True, help="a trained model: mlp, vgg16, ...")
    predict.add_argument("--top", type=int, default=3, help="classes shown per image (3)")
    predict.add_argument("images", nargs="+", help="image files (jpg, png, ...)")
    args = parser.parse_args(argv)
    for path, ranked in predict_files(args.model, args.images, args.top):
        print(path)
        for name, probability in ranked:
            print(f"  {name:<12} {probability:.3f}")


if __name__ == "__main__":
    main()
