"""Domain exceptions shared by every service.

Each protocol maps these to its wire status in exactly one place (the gRPC interceptor in
common/grpc_util.py, the FastAPI handlers in api/errors.py). Messages name what was wrong.
"""


class PipeserveError(Exception):
    """Base class: every error a client or operator can act on."""


class ModelNotFoundError(PipeserveError):
    """model_name names nothing we can load here."""


class ModelFormatError(PipeserveError):
    """A model file is corrupt, truncated, missing a tensor or has a wrong shape."""


class InvalidInputError(PipeserveError):
    """A request is malformed: wrong shape/dtype, positions out of order, empty batch..."""


class ContextLengthError(InvalidInputError):
    """A sequence would grow past the model's (or the configured) context length."""


class CacheBudgetError(PipeserveError):
    """Admitting the tokens would exceed a stage's KV-cache token budget."""


class UnknownRequestError(InvalidInputError):
    """A request id this stage holds no cache for."""


class ConfigError(PipeserveError):
    """config.json is invalid; the message names the field and the node."""


class StageUnavailableError(PipeserveError):
    """No healthy node serves a model part."""


class QueueFullError(PipeserveError):
    """The coordinator's waiting queue is full; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
