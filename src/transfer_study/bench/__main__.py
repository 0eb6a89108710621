"""python -m transfer_study.bench [study] ...: the features benchmark, or the study timer."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["study"]:
        from transfer_study.bench.study import main as time_study  # imports no torch first

        return time_study(argv[1:])
    from transfer_study.bench.features import main as benchmark

    return benchmark(argv)


if __name__ == "__main__":
    main()
