"""Errors that reach the user as one line: what is wrong and how to mend it.

The CLI turns `UsageError` into exit code 2 and `VerificationError` into exit code 1, without a
traceback unless `--verbose` is given.
"""


class ConvlowerError(Exception):
    """Base of every error convlower raises on purpose."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what}; {fix}" if fix else what)


class UsageError(ConvlowerError):
    """Bad input or bad usage: a wrong path, a model that does not load, an unknown variant."""

    exit_code = 2


class VerificationError(ConvlowerError):
    """A result would be wrong: outputs disagree beyond tolerance, or a Conv is left under --no-ops."""

    exit_code = 1
