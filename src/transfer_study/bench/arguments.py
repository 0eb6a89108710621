"""Arguments the benchmarks share."""

import argparse

from transfer_study.core.stage import shown


def at_least(low):
    """An argparse type: a whole number >= `low`. Anything less is an argparse error before any
    work: a count of 0 or below would crash later, or be read as another count (--epochs -3
    trained one epoch, --test-images -1 scored all but one image)."""

    def whole_number(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"accepts an integer >= {low}, got {shown(text)}")
        return value

    return whole_number
