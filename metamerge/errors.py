"""Error types that tell the orchestrator whether a retry can help.

`InputError` and its children are deterministic: the same inputs fail the same way, so
flows must not retry them. `TransientError` marks failures of the outside world (network,
S3) that a retry with backoff may cure.
"""


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


class TransientError(MetamergeError):
    """A failure of the outside world (network, storage) that a retry may cure."""


def is_retryable(exc: BaseException) -> bool:
    """Deterministic input errors never get better on retry; everything else might."""
    return not isinstance(exc, InputError)
