"""Errors users can act on, each mapped to a CLI exit code.

Exit codes: 0 success, 1 unexpected internal error, 2 usage error (bad option values),
3 bad input (missing, corrupt or inconsistent checkpoints; also ResourceError: not enough memory
for the input's tensors), 4 output refused (exists, unsafe place, locked by another run,
unwritable, disk full), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""


class Rank1Error(Exception):
    """Base class: the message is one line a user can act on."""

    exit_code = 1


class UsageError(Rank1Error):
    """An option value is invalid (e.g. a malformed --steps)."""

    exit_code = 2


class InputError(Rank1Error):
    """An input path, file or tensor is missing, unreadable or inconsistent."""

    exit_code = 3


class OutputError(Rank1Error):
    """The output cannot be written where asked (exists without --force, inside an input, ...)."""

    exit_code = 4


class ResourceError(Rank1Error):
    """The input needs more host memory than is available (checked before any work)."""

    exit_code = 3


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs exactly as for Ctrl-C."""

    exit_code = 143
