"""Messages for the person at the terminal: one line each on stderr, whatever Python's warnings filter says.

convlower's warnings (a symbolic dim bound to a default, a tuning cache it cannot use) and notices
(CUDA did not load, so CPU runs) are what a user needs to trust a result, so they are written to
stderr directly, not left to Python's warnings filter, which `PYTHONWARNINGS=ignore` or a test
runner silences. Each warning is also issued as a `ConvlowerWarning` for library users who want to
catch it or make it an error (`warnings.simplefilter("error", ConvlowerWarning)`); that category is
ignored by default, as DeprecationWarning is, so a terminal does not see the message twice.
"""

from __future__ import annotations

import sys
import warnings


class ConvlowerWarning(UserWarning):
    """Base of convlower's warnings; each one has already been written to stderr by `warn`."""


warnings.filterwarnings("ignore", category=ConvlowerWarning, append=True)

verbose = False
"""Set by the CLI's --verbose: notices then add their whole reason (onnxruntime's words) after the short line."""


def notice(message: str) -> None:
    """One line on stderr, prefixed `convlower: `."""
    print(f"convlower: {message}", file=sys.stderr)


def warn(message: str, category: type[ConvlowerWarning] = ConvlowerWarning, stacklevel: int = 2) -> None:
    """`convlower: warning: MESSAGE` on stderr, and `message` issued as `category` for library users.

    `stacklevel` counts as for `warnings.warn` from the caller: 2 names the caller's caller.
    """
    notice(f"warning: {message}")
    warnings.warn(message, category, stacklevel=stacklevel + 1)
