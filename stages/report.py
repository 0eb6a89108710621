"""Stage report: reports/report.md with its table and figures."""

from transfer_study.core.config import load_params
from transfer_study.core.stage import exit_on_user_error
from transfer_study.report import write_report


@exit_on_user_error
def main():
    write_report(load_params().models)


if __name__ == "__main__":
    main()
