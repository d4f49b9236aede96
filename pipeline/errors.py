"""One error path for everything a user can get wrong.

Every error a user can cause (a missing or malformed input, a bad params value, no key, an output
that cannot be written) is a :class:`MedtlError`: its message is one line that names the file (or
params key) and the problem, and says what to do where that is not obvious. The CLI prints it as
``medtl: error: <message>`` and exits with status 2, without a traceback (``-v`` shows one).
Anything else that escapes is a bug in medtl and keeps its traceback.

Messages never quote header values or file contents (they may be PHI); they name attributes,
categories and paths the user gave on the command line or in params.yaml.
"""

from __future__ import annotations

#: exit status of a user error (argparse uses the same for bad arguments)
USER_ERROR = 2


class MedtlError(Exception):
    """A user error: the message is one line naming the file and the problem."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())  # one line, whatever was passed in


def output_error(path, exc: OSError) -> MedtlError:
    """A MedtlError for an output path that cannot be created or written (permission, read-only, not a dir)."""
    reason = exc.strerror or type(exc).__name__
    return MedtlError(f"{path}: cannot write output here ({reason})")
