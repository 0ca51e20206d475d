"""What the HTTP layer sees of an engine: :class:`ServedEngine` (all it may call), the options a request sends,
the result it gets back, what the engine serves (:class:`EngineInfo`), and the observer it reports its steps to.
A leaf: nothing here imports the engine's parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch


INTEGER_ENCODINGS = {"int8": "int8", "uint8": "uint8", "binary": "int8", "ubinary": "uint8"}  # name -> numpy dtype


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    dimensions: int | None = None
    """Keep the first k values, then L2-renormalise."""
    normalize: bool | None = None
    """None: as the model's modules say."""
    truncate: bool | None = None
    """None: the server's setting."""
    long_input: str | None = None
    """An input longer than the model: "truncate", "error" (a 400) or "mean" (consecutive windows, their vectors'
    mean weighted by tokens); None: as ``truncate`` says, else the server's --long-input."""
    truncate_start: bool = False
    """An over-long input loses its start, not its end (Cohere's ``truncate: START``): the model's start tokens,
    then the input's last tokens, then its end tokens."""
    prompt_name: str | None = None
    """One of the model's sentence-transformers prompts; None: its default prompt, if any."""
    query: bool = False
    """The inputs are queries (sentence-transformers' ``encode_query``): the model's ``query`` prompt when no
    ``prompt_name`` is given, and an inference-free SPLADE model's query side."""
    sparse: bool = False
    """Sparse vectors: a SPLADE model's (its only output) or bge-m3's lexical weights; ``top_k``: keep each
    vector's k largest weights; ``include_dense`` (bge-m3): the dense vectors too, from the same forward."""
    top_k: int | None = None
    include_dense: bool = False
    multi_vector: bool = False
    """Per-token vectors (bge-m3's colbert vectors), each input's an ``[n, C]`` matrix; ``include_sparse`` /
    ``include_multi_vector`` add the other outputs to the first one asked for, from the same forward pass."""
    include_sparse: bool = False
    include_multi_vector: bool = False
    late_chunking: bool = False
    """The inputs are consecutive chunks of one document: it runs whole (in overlapping windows if longer than the
    model), and each chunk's vector is the mean of its own tokens' final states (:mod:`embedserve.engine.late`)."""
    late_chunking_overlap: int | None = None
    """Tokens a window repeats from the one before; None: the server's --late-chunking-overlap."""
    priority: int | None = None
    """0-999, lower first: the scheduler fills each step by priority, then age; None: --default-priority."""
    encodings: tuple[str, ...] = ()
    """Byte forms wanted beside the float vectors, any of: ``base64`` (little-endian float32,
    as base64 text), ``int8`` / ``uint8`` (one byte per value, with ranges calibrated per model and width),
    ``binary`` / ``ubinary`` (one bit per value; the width must be a multiple of 8). The first is made on the
    device with the pooling, any others from the same vectors."""


@dataclass(frozen=True)
class StepSpan:
    """A forward step a request took part in (for its trace): when it ran (``time.perf_counter``), and its size."""

    start: float
    end: float
    tokens: int  # the step's, every request's
    inputs: int


@dataclass(frozen=True)
class Timings:
    tokenize_s: float = 0.0
    queue_s: float = 0.0  # queued until its first input entered a forward pass
    inference_s: float = 0.0  # from then until its last input came out
    queued_at: float = 0.0  # ``time.perf_counter`` when its inputs were queued (tokenisation done); 0: unknown
    steps: tuple[StepSpan, ...] = ()  # the forward steps it took part in


@dataclass(frozen=True)
class EmbedResult:
    vectors: torch.Tensor  # [n, k] float32, CPU
    token_counts: list[int]
    encoded: dict[str, list[bytes]] = field(default_factory=dict)  # per encoding asked for: each input's bytes
    timings: Timings = Timings()
    # sparse output: per input, its nonzero (token ids ascending, weights); ``vectors`` is then empty unless the
    # request asked for the dense vectors too
    sparse: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    multi: list[torch.Tensor] | None = None  # multi-vector output: per input, its [n, C] vectors

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def base64(self) -> list[bytes] | None:
        return self.encoded.get("base64")


class StepObserver:
    """What the engine reports about its work; the HTTP layer's metrics implement it. Called from the
    engine thread, so implementations must be thread-safe (prometheus-client's are)."""

    def step(self, inputs: int, tokens: int, seconds: float) -> None: ...

    def step_failed(self, inputs: int) -> None: ...

    def step_split(self, inputs: int) -> None:
        """A step ran out of device memory and is retried in parts."""


@dataclass(frozen=True, kw_only=True)
class EngineInfo:
    """What a loaded engine serves and under which limits: fixed once it has loaded (``Engine.info``). The HTTP
    layer describes the model from this (``/info``, ``/v1/models``, metrics), never from the engine's parts."""

    name: str
    kind: str  # embedding, sparse, rerank or classify
    dimensions: int
    max_input_length: int  # tokens
    max_batch_tokens: int
    max_batch_requests: int
    max_queue: int  # inputs waiting or running before 429
    id_limit: int  # token ids the model takes: 0 .. id_limit - 1
    pooling: str | None  # embedding models
    labels: tuple[str, ...] | None  # rerankers and classifiers
    dtype: str  # the float parts' (model_dtype)
    quantize: str  # none or int8
    device: str
    commit: str | None  # the Hub commit served, None for a local folder
    tokenizer_workers: int
    prompts: tuple[str, ...] = ()  # the names of the model's prompts that are not empty
    lexical: bool = False  # an embedding model that also gives sparse vectors (bge-m3's lexical weights)
    multi_vector: bool = False  # ... and per-token vectors (bge-m3's colbert vectors)


class ServedEngine(Protocol):
    """The one interface the HTTP layer talks to (``engine.front.Engine`` implements it): what the engine serves,
    and awaitables that run on the engine's own pools and thread. Nothing else of an engine is the HTTP layer's."""

    info: EngineInfo

    async def embed(self, inputs: Sequence[str | Sequence[int]], options: EmbedOptions = ...) -> EmbedResult:
        """Embed a request's inputs (texts, or token ids below ``info.id_limit``)."""

    async def score(self, pairs: Sequence[tuple[str, str | None]], *, truncate: bool | None = None,
                    max_doc_tokens: int | None = None, route: str = "rerank", priority: int | None = None
                    ) -> EmbedResult:
        """A cross-encoder's or classifier's logits for (query, document) pairs (single texts: None second)."""

    def scores(self, logits: torch.Tensor, *, raw: bool = False, activation: str | None = None) -> torch.Tensor:
        """:meth:`score`'s logits as scores: the model's activation, the one named, or raw."""

    async def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[tuple]]:
        """Each text's tokens as (id, text, special, start, stop)."""

    async def decode(self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]: ...

    def prompt(self, name: str | None) -> str:
        """One of the model's prompts (None: its default); an unknown name is a 400."""

    def queue_stats(self) -> tuple[int, int, int, int]:
        """(waiting inputs, waiting tokens, running inputs, inputs dropped by cancellation so far)."""

    def waiting_by_priority(self) -> dict[int, int]:
        """Inputs waiting, per priority level that has any."""
