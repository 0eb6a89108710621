"""The command line, `transfer-study`: predict, lr-find, tune and bench."""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from transfer_study.bench.arguments import at_least
from transfer_study.core.stage import exit_on_user_error

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


def _tune(args):
    from transfer_study.tune.search import describe, run_search
    from transfer_study.tune.space import load_search

    chosen = {"trials": args.trials, "sampler": args.sampler}
    search = load_search(args.search, {key: v for key, v in chosen.items() if v is not None})
    name = args.name or Path(args.search).stem
    print(describe(search, name, search.settings.trials), flush=True)
    try:
        run_search(search, name, search.settings.trials)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished trials are kept; run the same command to go on (the "
            "interrupted trial runs again)",
            file=sys.stderr,
        )
        sys.exit(130)


@exit_on_user_error
def main(argv=None):
    try:
        _main(argv)
    except BrokenPipeError:  # the reader stopped early (| head): no traceback, as Python's docs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        sys.exit(1)


def _main(argv):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmarks parse their own arguments
        from transfer_study.bench.__main__ import main as bench

        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="transfer-study")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "bench",
        help="the benchmarks: features, study, cut (transfer-study bench -h)",
        add_help=False,
    )
    tune = commands.add_parser(
        "tune",
        help="search params with Optuna, each trial a DVC experiment (docs/experiments.md)",
        description="A seeded TPE (or random) search over the keys a search file declares, each "
        "trial a named DVC experiment run in a temporary copy of the project; maximizes the "
        "model's kept-epoch val accuracy. Run the same command again to resume.",
    )
    tune.add_argument("search", help="a search file, such as search/lite0-head.yaml")
    tune.add_argument("--name", help="the search's name, its experiments' prefix (the file's stem)")
    tune.add_argument("--trials", type=at_least(1), help="trials in all (the file's `trials`)")
    tune.add_argument("--sampler", choices=("tpe", "random"), help="the file's `sampler`")
    finder = commands.add_parser(
        "lr-find",
        help="sweep the lr of a model's training, plot its loss, suggest an lr (in the project)",
        description="Lightning's lr finder over what the model trains on (cached features or "
        "activations of a backbone: seconds; images for the MLP and fine-tuning from images), "
        "after dvc repro made them. Prints the suggested lr as a -S argument for dvc exp run.",
    )
    finder.add_argument("model", help="a model in the study: mlp, vgg16, lite0, ...")
    finder.add_argument("--min-lr", type=float, default=1e-6, help="first lr of the sweep (1e-6)")
    finder.add_argument("--max-lr", type=float, default=1.0, help="last lr of the sweep (1)")
    finder.add_argument("--steps", type=at_least(20), default=100, help="batches swept (100)")
    finder.add_argument("--plot", help="the loss curve's PNG (plots/lr_find/MODEL.png)")
    predict = commands.add_parser(
        "predict",
        help="top classes of image files and folders under a trained model (run in the project)",
    )
    predict.add_argument("--model", required=True, help="a trained model: mlp, vgg16, ...")
    predict.add_argument("--top", type=at_least(1), default=3, help="classes shown per image (3)")
    predict.add_argument(
        "--format", choices=("text", "csv", "json"), default="text", help="output (text)"
    )
    predict.add_argument("images", nargs="+", help="image files (jpg, png, ...) or folders")
    args = parser.parse_args(argv)
    return {"tune": _tune, "lr-find": _lr_find, "predict": _predict}[args.command](args)


def _lr_find(args):
    from transfer_study.core.config import load_params
    from transfer_study.core.params_file import read_params
    from transfer_study.lr_find import (  # torch and Lightning: only to sweep
        check_range,
        plot_sweep,
        suggested_override,
        sweep_lr,
    )

    check_range(args.min_lr, args.max_lr)
    sweep = sweep_lr(args.model, load_params(), args.min_lr, args.max_lr, args.steps)
    plot = Path(args.plot or f"plots/lr_find/{args.model}.png")
    plot_sweep(sweep, args.model, plot)
    print(f"{args.model}: {len(sweep.lrs)} steps from {sweep.lrs[0]:.2g} to {sweep.lrs[-1]:.2g}")
    print(f"loss curve: {_shown(plot)}")
    if sweep.suggested is None:
        print("no suggestion: too few finite losses; raise --steps or lower --max-lr")
        sys.exit(1)
    print(f"suggested lr: {sweep.suggested:.3g} (the steepest fall of the loss)")
    print(f"  dvc exp run {suggested_override(args.model, sweep.suggested, read_params())}")


def _predict(args):
    from transfer_study.predict import image_files, predict_files  # torch: only to predict

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
