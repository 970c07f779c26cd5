"""One error type for bad user input: the CLIs print its message and exit non-zero, no traceback."""
from __future__ import annotations

import os

import click


class UserError(click.ClickException):
    """A problem the user can fix (wrong path, mismatched teacher, bad option). Message says how."""

    exit_code = 2


class DiskFullError(UserError):
    """The device holding `path` ran out of space (or quota, or the file-size limit) while it was written.
    The half-written temp file is removed: nothing is left under the final name."""

    DEFAULT_FIX = "make room (free space, or raise the quota or limit) and rerun the same command"

    def __init__(self, path: str | os.PathLike, reason: str, fix: str = DEFAULT_FIX):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot write {path}: {reason} (nothing was left under that name); {fix}")

    def with_fix(self, fix: str) -> "DiskFullError":
        """The same error with a command-specific fix."""
        return DiskFullError(self.path, self.reason, fix)
