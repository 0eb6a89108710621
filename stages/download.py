"""Stage download: fetch the dataset archive named by data.url, verified against data.md5."""

from transfer_study import layout
from transfer_study.download import fetch
from transfer_study.errors import exit_on_user_error
from transfer_study.params import load_params


@exit_on_user_error
def main():
    data = load_params().data
    fetch(data.url, layout.ARCHIVE, data.md5)


if __name__ == "__main__":
    main()
