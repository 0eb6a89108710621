"""Command line: python -m transfer_study predict --model NAME IMAGE_OR_FOLDER..."""

import argparse
import csv
import json
import os
import sys

from tqdm import tqdm

from transfer_study.core.stage import exit_on_user_error
from transfer_study.predict import image_files, predict_files

PROGRESS_FROM = 300  # images; fewer finish before a progress bar would say anything


def _shown(path):
    """A path as printable text: bytes of a file name that are not UTF-8 shown escaped (\\xff),
    so a strict UTF-8 stdout (PYTHONIOENCODING=utf-8:strict) can always print it."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _writer(form):
    """A function that prints one image's result (path, [(class, probability), ...]) as `form`."""
    if form == "csv":
        table = csv.writer(sys.stdout)
        header_written = False

        def row(path, ranked):
            nonlocal header_written
            if not header_written:  # as many class columns as there are: `top`, or the classes
                ranks = range(1, len(ranked) + 1)
                columns = (f"{kind}_{r}" for r in ranks for kind in ("class", "probability"))
                table.writerow(["path", *columns])
                header_written = True
            table.writerow([_shown(path), *(x for name, p in ranked for x in (name, f"{p:.4f}"))])

        return row
    if form == "json":  # JSON Lines: one object per image, readable as the results stream in
        return lambda path, ranked: print(
            json.dumps(
                {
                    "path": _shown(path),
                    "top": [{"class": c, "probability": round(p, 4)} for c, p in ranked],
                }
            )
        )

    def text(path, ranked):
        print(_shown(path))
        for name, probability in ranked:
            print(f"  {name:<12} {probability:.3f}")

    return text


@exit_on_user_error
def main(argv=None):
    try:
        _main(argv)
    except BrokenPipeError:  # the reader stopped early (| head): no traceback, as Python's docs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        sys.exit(1)


def _main(argv):
    parser = argparse.ArgumentParser(prog="python -m transfer_study")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict",
        help="top classes of image files and folders under a trained model (run in the project)",
    )
    predict.add_argument("--model", required=True, help="a trained model: mlp, vgg16, ...")
    predict.add_argument("--top", type=int, default=3, help="classes shown per image (3)")
    predict.add_argument(
        "--format", choices=("text", "csv", "json"), default="text", help="output (text)"
    )
    predict.add_argument("images", nargs="+", help="image files (jpg, png, ...) or folders")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    files, problems = image_files(args.images)
    for path, why in problems:
        print(f"error: {_shown(path)}: {why}", file=sys.stderr)
    write = _writer(args.format)
    failed = len(problems)
    if not files:
        print(f"{failed} of {failed} inputs failed", file=sys.stderr)
        sys.exit(1)
    with tqdm(
        total=len(files), unit="img", file=sys.stderr, disable=len(files) < PROGRESS_FROM
    ) as bar:
        for path, ranked, why in predict_files(args.model, files, args.top):
            if ranked is None:
                failed += 1
                bar.write(f"error: cannot read image {_shown(path)} ({why})", file=sys.stderr)
            else:
                with tqdm.external_write_mode(file=sys.stdout):  # the bar steps aside
                    write(path, ranked)
                    sys.stdout.flush()
            bar.update()
    if failed:
        print(f"{failed} of {len(files) + len(problems)} inputs failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
