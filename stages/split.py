"""Stage split: seeded, stratified train/val/test splits as uint8 arrays, one file per split."""

from transfer_study import layout
from transfer_study.atomic import write_json
from transfer_study.data import make_splits, read_cifar10, save_split, split_counts
from transfer_study.errors import exit_on_user_error
from transfer_study.params import load_params


@exit_on_user_error
def main():
    params = load_params()
    data = params.data
    train, test = read_cifar10(layout.ARCHIVE)
    splits = make_splits(
        train, test, data.val_fraction, params.seed, data.train_size, data.test_size
    )
    for name, split in splits.items():
        save_split(split, layout.split_file(name))
    write_json(layout.METRICS_DIR / "split.json", split_counts(splits))


if __name__ == "__main__":
    main()
