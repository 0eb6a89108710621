"""python -m transfer_study.bench [study|cut] ...: the features benchmark, the study timer, or
partial fine-tuning from cached activations against from images."""

import argparse
import sys

from transfer_study.bench.arguments import at_least


def features_arguments(argv):
    """The features benchmark's arguments, parsed before torch is imported: a typo is answered
    at once, not after seconds of imports."""
    parser = argparse.ArgumentParser(
        prog="python -m transfer_study.bench",
        description="The notebooks' per-image PIL pipeline against cached features, side by side "
        "(python -m transfer_study.bench study -h: the study timer)",
    )
    parser.add_argument("--archive", help="CIFAR-10 python archive (default: random images)")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 256 images, vgg16 only")
    parser.add_argument(
        "--images", type=at_least(1), help="images per run (default 256 quick, 4096)"
    )
    parser.add_argument("--backbones", nargs="+", help="default: vgg16 (quick), vgg16 inception")
    parser.add_argument(
        "--image-size", type=at_least(1), help="every backbone's input size (at least its minimum)"
    )
    parser.add_argument("--weights", default="none", help="none (default), imagenet or a path")
    parser.add_argument(
        "--precision-check",
        action="store_true",
        help="instead of timing: head test accuracy on bf16 vs fp32 features (needs --archive)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study"]:
        from transfer_study.bench.study import main as time_study  # imports no torch first

        return time_study(argv[1:])
    if argv[:1] == ["cut"]:
        from transfer_study.bench.cut import main as time_cut

        return time_cut(argv[1:])
    args = features_arguments(argv)
    from transfer_study.bench.features import main as benchmark

    return benchmark(args)


if __name__ == "__main__":
    main()
