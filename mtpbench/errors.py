"""One error type for problems a user can fix; the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or an unusable checkpoint: shown to the user as a single line, no traceback."""

    exit_code = 2
