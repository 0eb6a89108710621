"""Stage download: fetch the files of data.dataset (data.url), verified against data.md5."""

from transfer_study.core import paths
from transfer_study.core.config import load_params
from transfer_study.core.stage import exit_on_user_error
from transfer_study.download import download_dataset


@exit_on_user_error
def main():
    download_dataset(load_params().data, paths.RAW_DIR)


if __name__ == "__main__":
    main()
