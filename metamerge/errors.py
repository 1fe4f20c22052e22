"""Error types that tell the orchestrator whether a retry can help.

`InputError` and its children are deterministic: the same inputs fail the same way, so
flows must not retry them. `TransientError` marks failures of the outside world (network,
S3) that a retry with backoff may cure. A full disk, a read-only file system and a refused
permission are deterministic too: `WriteError`, and a raw `OSError` with one of those errnos
is never retried either.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MetamergeError(Exception):
    """Base class; the message is one line meant for a human."""


class InputError(MetamergeError):
    """Bad input: retrying cannot help."""


class RecipeError(InputError):
    """The recipe YAML is malformed or names an invalid value."""


class RefError(InputError):
    """A model reference cannot be resolved (missing path, unknown scheme)."""


class CheckpointError(InputError):
    """A checkpoint is corrupt, truncated, incompatible or contains non-finite values."""


class EvaluationError(MetamergeError):
    """lm-eval could not score a model."""


class GateError(InputError):
    """The merged model did not pass the recipe's quality gate."""


class OutputError(InputError):
    """A place metamerge would write to is refused: it holds data metamerge did not write, or an input."""


class WriteError(InputError):
    """A local write failed for a reason a retry cannot cure: no space, read-only, permission."""


class CredentialsError(InputError):
    """S3 refused the credentials (or there are none): retrying with the same ones cannot help."""


class NotPublishedError(InputError):
    """There is no published run (no manifest) at the given location."""


class TransientError(MetamergeError):
    """A failure of the outside world (network, storage) that a retry may cure."""


# a full disk / quota, a read-only file system, a refused permission: the same on every retry
DETERMINISTIC_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_deterministic_os_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DETERMINISTIC_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """`No space left on device (ENOSPC)`."""
    cause = exc.strerror or os.strerror(exc.errno or 0)
    return f"{cause} ({errno.errorcode.get(exc.errno or 0, str(exc.errno))})"


def write_error(exc: OSError, path: Path | str | None = None) -> WriteError:
    """One line naming the path and the cause: `cannot write /x/out: No space left on device (ENOSPC)`."""
    where = path if path is not None else (exc.filename or "?")
    return WriteError(f"cannot write {where}: {describe_os_error(exc)}")


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turns ENOSPC / EROFS / EACCES (and kin) raised inside into a one-line WriteError naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DETERMINISTIC_ERRNOS:
            raise write_error(exc, path) from None
        raise


def is_retryable(exc: BaseException) -> bool:
    """Deterministic input errors never get better on retry; everything else might."""
    return not isinstance(exc, InputError) and not is_deterministic_os_error(exc)
