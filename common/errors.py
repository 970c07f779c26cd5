"""One error type for bad user input: the CLIs print its message and exit non-zero, no traceback."""
import click


class UserError(click.ClickException):
    """A problem the user can fix (wrong path, mismatched teacher, bad option). Message says how."""

    exit_code = 2
