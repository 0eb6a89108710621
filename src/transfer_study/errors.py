"""User-facing errors: one line that names the problem and the fix, no traceback."""

import functools
import sys


class UserError(Exception):
    """A problem with params, data or the environment that the user can fix."""


def exit_on_user_error(main):
    """Wrap a stage's main(): a UserError prints one line and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
