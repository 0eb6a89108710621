"""Stage split: seeded, stratified train/val/test splits as uint8 arrays, one file per split."""

import sys

from transfer_study.core import paths
from transfer_study.core.atomic import write_json
from transfer_study.core.config import load_params
from transfer_study.core.stage import exit_on_user_error
from transfer_study.data.readers import read_dataset
from transfer_study.data.splits import make_splits, save_split, split_counts


@exit_on_user_error
def main():
    params = load_params()
    data = params.data
    train, test, skipped = read_dataset(paths.RAW_DIR, data)
    splits = make_splits(
        train, test, data.val_fraction, params.seed, data.train_size, data.test_size
    )
    for name, split in splits.items():
        save_split(split, paths.split_file(name))
    for path in skipped:
        print(f"skipped unreadable image {path}", file=sys.stderr)
    write_json(paths.METRICS_DIR / "split.json", {**split_counts(splits), "skipped": len(skipped)})


if __name__ == "__main__":
    main()
