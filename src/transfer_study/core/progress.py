"""How stages show progress: redrawn bars on a terminal or in a notebook, a few lines in a log."""

import os
import sys
import time

from tqdm import tqdm

from transfer_study.core.stage import UserError, shown

# bar: bars redrawn in place (a terminal; a notebook, which renders carriage returns); lines: a
# line now and then, for a log file; auto: bars when stdout and stderr are both a terminal (DVC
# and Lightning write to one, tqdm to the other), else lines.
VARIABLE = "TRANSFER_STUDY_PROGRESS"
MODES = ("auto", "bar", "lines")
LINE_EVERY = 0.1  # of a pass: a log gets at most 10 lines per pass over a split


def bars():
    """Whether progress is drawn as bars (else printed as lines), from TRANSFER_STUDY_PROGRESS.
    Stages call it before any work, so a bad value is refused at once."""
    mode = os.environ.get(VARIABLE, "auto")
    if mode not in MODES:
        accepted = ", ".join(MODES)
        raise UserError(f"environment variable {VARIABLE} = {shown(mode)}: accepts {accepted}")
    return mode == "bar" or (mode == "auto" and sys.stdout.isatty() and sys.stderr.isatty())


def progress(total, desc, unit="img", unit_scale=False):
    """A tqdm bar on stderr, or in lines mode a LogLines: both take update(n) and write(text).
    `total` may be None (a download of unknown size); `unit_scale`: 85.6M, not 85600000."""
    if bars():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr)
    return LogLines(total, desc, unit, unit_scale)


class LogLines:
    """Progress for a log file: one line each time another tenth of the work is done, with the
    rate and the time left, and never a carriage return. Of unknown total, one line at the end."""

    def __init__(self, total, desc, unit, unit_scale=False):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.done = 0
        self.next_line = LINE_EVERY * total if total else float("inf")
        self.start = time.perf_counter()

    def update(self, count=1):
        self.done += count
        if self.done >= self.next_line:
            while self.next_line <= self.done:
                self.next_line += LINE_EVERY * self.total
            self._line()

    def _line(self):
        unit = "{unit}" if self.unit_scale else " {unit}"  # 52.4MB, 1000/1000 img
        if self.total:
            shape = "{percentage:3.0f}% ({n_fmt}/{total_fmt}" + unit + ") {elapsed}, {rate_fmt}"
            shape += ", {remaining} left"
        else:
            shape = "{n_fmt}" + unit + " {elapsed}, {rate_fmt}"
        elapsed = time.perf_counter() - self.start
        self.write(
            tqdm.format_meter(
                self.done,
                self.total,
                elapsed,
                prefix=self.desc,
                unit=self.unit,
                unit_scale=self.unit_scale,
                bar_format="{desc}: " + shape,
            )
        )

    def write(self, text, file=None):
        print(text, file=file or sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.total and self.done and exc[0] is None:
            self._line()
        return False
