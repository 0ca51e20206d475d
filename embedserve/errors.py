"""One exception tree. Each class carries the HTTP status and OpenAI error type it maps to.

stdlib only: every layer may raise these, and the HTTP layer turns them into responses in one place.
"""

from __future__ import annotations


QUOTE_LIMIT = 64  # characters of a client's value an error message repeats


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters of the value: a message never grows
    with what a client sent."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:limit]!r}... ({len(text)} characters)"


def clip(text: str, limit: int = 200) -> str:
    """A message built from client input (a decoder's complaint), cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class EmbedServeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(EmbedServeError):
    """The request itself is wrong: the client must change it."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"

    def __init__(self, max_tokens: int, requested: int, *, index: int | None = None, at_least: bool = False
                 ) -> None:
        """``at_least``: ``requested`` counts the tokens read before the input was known to be too long."""
        where = "" if index is None else f" in input[{index}]"
        super().__init__(
            f"This model's maximum context length is {max_tokens} tokens, however you requested "
            f"{'at least ' if at_least else ''}{requested} tokens{where}. Please reduce the length of the input, "
            f'or send "truncate": true to have it cut to {max_tokens} tokens.',
            param="input",
        )
        self.max_tokens = max_tokens
        self.requested = requested


class InputTooLarge(InvalidRequest):
    """One input does not fit in device memory even in a forward pass of its own."""

    code = "input_too_large"

    def __init__(self, index: int, tokens: int, max_batch_tokens: int) -> None:
        super().__init__(
            f"input[{index}] ({tokens} tokens) does not fit in the device's memory even in a forward pass of its "
            f"own. Send a shorter input. The server's operator can leave more memory free by lowering "
            f"--max-batch-tokens (now {max_batch_tokens}), or cap inputs with --max-input-tokens.",
            param="input",
        )


class WrongModelKind(InvalidRequest):
    """A route the served model's kind cannot answer: embeddings from a reranker, rerank from an embedder."""

    def __init__(self, route: str, kind: str, wanted: str) -> None:
        names = {"embedding": "an embedding model", "rerank": "a reranker (cross-encoder)",
                 "classify": "a sequence classifier",
                 "sparse": "a sparse model (SPLADE, or one with bge-m3's lexical weights)",
                 "multi_vector": "a multi-vector model (a ColBERT model, or one with bge-m3's colbert vectors)"}
        super().__init__(f"{route} needs {names[wanted]}, and the served model is {names[kind]} (kind {kind!r})",
                         code="wrong_model_kind")


class Unauthorized(EmbedServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(EmbedServeError):
    status = 404
    type = "invalid_request_error"


class PayloadTooLarge(EmbedServeError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Overloaded(EmbedServeError):
    """The queue is full. Clients retry 429 after Retry-After."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(EmbedServeError):
    """Not ready yet (loading, warming up) or no longer (draining). Clients retry 503 elsewhere or later."""

    status = 503
    type = "server_error"
    code = "not_ready"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class EngineFailed(ServiceUnavailable):
    """The engine stopped for good (a device error poisoned the CUDA context): this replica is going away."""

    code = "engine_failed"


class EngineError(EmbedServeError):
    """A forward pass failed; the requests in that batch get this, the server keeps serving."""

    status = 500
    type = "server_error"
    code = "engine_error"


class ModelLoadError(EmbedServeError):
    """A model directory cannot be served: a missing file, an unknown tensor, an unsupported architecture."""


class ConfigError(EmbedServeError):
    """A configuration value is out of range or inconsistent with the model."""
