"""Errors the user can act on.

Anything raised as UserError is printed as one clear message by the command-line scripts and
ends the run with a non-zero exit status, instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input (files, options, model folders) and what to do about it."""

    exit_code = 2


class Stopped(Exception):
    """The run stopped on request (a signal) after saving what it needs to continue."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class EchoedError(UserError):
    """Another rank's UserError, already reported by that rank: this rank ends with its exit code
    without printing it again (N processes would otherwise print N copies)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
