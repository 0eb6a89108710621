"""Stage download: fetch the files of data.dataset (data.url), verified against data.md5."""

from transfer_study import layout
from transfer_study.download import download_dataset
from transfer_study.errors import exit_on_user_error
from transfer_study.params import load_params


@exit_on_user_error
def main():
    download_dataset(load_params().data, layout.RAW_DIR)


if __name__ == "__main__":
    main()
