"""Configuration: frozen keyword-only dataclasses, validated once when built. stdlib only.

cli.py builds the tree from flags and EMBEDSERVE_* variables; everything else receives it explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedserve.errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZE = ("none", "int8")
TOKEN_ID_POLICIES = ("cl100k", "model")
POOL_KERNELS = ("auto", "triton", "torch")
FAULT_KINDS = ("error", "fatal", "oom", "crash")
KINDS = ("auto", "embedding", "rerank")
ATTENTION_BACKENDS = ("auto", "torch_varlen", "flash_attn", "sdpa", "sdpa_bucketed", "sdpa_segments", "dense")


# Tokens packed into one forward pass when --max-batch-tokens is not given, per device type (any other: the CPU's).
DEFAULT_BATCH_TOKENS = {"cuda": 16384, "cpu": 4096}


MAX_PRIORITY = 999  # priorities are 0 (first) to this, as Cohere's
OTLP_PROTOCOLS = ("http/protobuf", "grpc")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str
    """A local Hugging Face / sentence-transformers model directory, or a Hugging Face Hub repository id."""
    revision: str | None = None
    """Hub ids only: the branch, tag or commit to serve; None: main."""
    dtype: str = "auto"
    """auto: bfloat16 on CUDA; on the CPU bfloat16 where it is native (AVX512-BF16 / AMX), else float32 (exact)."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    attention: str = "auto"
    """Varlen attention backend; auto picks the fastest available for the device."""
    pool_kernel: str = "auto"
    """Pool+encode backend: auto (Triton on CUDA, the torch twin on CPU), triton or torch."""
    kind: str = "auto"
    """auto: embedding, or what a sequence-classification checkpoint is; rerank: also a causal LM scored by its
    yes / no logits (Qwen3-Reranker)."""
    prompts: tuple[tuple[str, str], ...] = ()
    """(name, text) prompts added to (or replacing) the folder's sentence-transformers prompts."""
    default_prompt_name: str | None = None
    """The prompt applied when a request names none; "" for none, None: the folder's default."""
    quantize: str = "none"
    """int8 (CPU): the encoder's linear layers with int8 weights, activations float32 (quantized per call)."""

    def __post_init__(self) -> None:
        for name, text in self.prompts:
            if not (isinstance(name, str) and name and isinstance(text, str)):
                raise ConfigError(f"prompts must map names to texts, got {name!r} = {text!r}")
        if self.default_prompt_name is not None and not isinstance(self.default_prompt_name, str):
            raise ConfigError(f"default_prompt_name must be a prompt's name, got {self.default_prompt_name!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize == "int8" and self.dtype not in ("auto", "float32"):
            raise ConfigError(f"quantize int8 runs its activations in float32, so dtype {self.dtype} cannot go "
                              f"with it: leave dtype auto (or float32)")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.pool_kernel not in POOL_KERNELS:
            raise ConfigError(f"pool_kernel must be one of {', '.join(POOL_KERNELS)}, got {self.pool_kernel!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_batch_tokens: int | None = None
    """Tokens packed into one forward pass; None: :data:`DEFAULT_BATCH_TOKENS` for the device."""
    max_batch_requests: int = 512
    """Inputs (sequences) packed into one forward pass."""
    max_queue: int = 16384
    """Inputs waiting or running; beyond it new requests are refused with 429."""
    chunk_tokens: int | None = None
    """Causal models: inputs longer than this run as chunks over a key cache, one per step.
    None: max_batch_tokens // 8; 0: never chunk (then max_batch_tokens must hold the longest input)."""
    max_kv_tokens: int | None = None
    """Causal models: key-cache tokens that long inputs in progress may hold together; new long inputs wait
    beyond it. None: max(4 * max_batch_tokens, the model's maximum input length)."""
    default_priority: int = 100
    """The priority (0-999, lower first) of a request that names none."""
    priority_share: float = 0.125
    """The part of each step's tokens the oldest waiting input earns while higher priorities pass it over: low
    priorities never starve (0: strict priority)."""

    def __post_init__(self) -> None:
        _positive("max_batch_tokens", self.max_batch_tokens)
        _positive("max_batch_requests", self.max_batch_requests)
        _positive("max_queue", self.max_queue)
        _positive("max_kv_tokens", self.max_kv_tokens)
        if isinstance(self.default_priority, bool) or not isinstance(self.default_priority, int) or not (
                0 <= self.default_priority <= MAX_PRIORITY):
            raise ConfigError(f"default_priority must be an integer from 0 to {MAX_PRIORITY}, got "
                              f"{self.default_priority!r}")
        if isinstance(self.priority_share, bool) or not isinstance(self.priority_share, (int, float)) or not (
                0 <= self.priority_share <= 1):
            raise ConfigError(f"priority_share must be a number from 0 to 1, got {self.priority_share!r}")
        if self.chunk_tokens is not None and (not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 0):
            raise ConfigError(f"chunk_tokens must be 0 (off) or a positive integer, got {self.chunk_tokens!r}")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: ModelConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    truncate: bool = True
    """Cut inputs longer than the model's maximum (as sentence-transformers does); False: refuse them."""
    tokenizer_workers: int = 2
    """Threads that tokenize off the event loop."""
    max_input_tokens: int | None = None
    """Cap on one input's tokens, below the model's own maximum; longer inputs are truncated or refused
    like any over-long input. None: the model's maximum."""
    max_tokens_per_request: int | None = None
    """Tokens (after tokenisation) one request may hold; None: no limit beyond the queue."""
    fault_marker: str | None = None
    """Testing only: a forward pass holding an input equal to this text fails."""
    fault_kind: str = "error"
    """Testing only: how that pass fails: "error" (that step's requests get 500), "fatal" (as a lost CUDA
    context: the engine stops and the process exits), "oom" (as torch.OutOfMemoryError: the step is split)."""
    long_input: str | None = None
    """An input longer than the model: "truncate", "error" or "mean" (windows averaged); None: as --truncate."""
    late_chunking_overlap: int | None = None
    """Tokens each window of a late-chunked document longer than the model repeats from the one before; None:
    min(256, the model's maximum // 4)."""
    int8_calibration: str | None = None
    """The int8 / uint8 output types' calibration texts: a file of one text per line; None: the built-in set."""
    token_ids: str = "cl100k"
    """How token-id inputs are read: "cl100k" (OpenAI clients' tiktoken ids, decoded to text) or "model"
    (ids of the served model's own tokenizer, used as given)."""

    def __post_init__(self) -> None:
        _positive("tokenizer_workers", self.tokenizer_workers)
        _positive("max_tokens_per_request", self.max_tokens_per_request)
        _positive("max_input_tokens", self.max_input_tokens)
        if self.long_input not in (None, "truncate", "error", "mean"):
            raise ConfigError(f"long_input must be truncate, error or mean, got {self.long_input!r}")
        if self.late_chunking_overlap is not None and self.late_chunking_overlap < 0:
            raise ConfigError(f"late_chunking_overlap must be 0 or more, got {self.late_chunking_overlap}")
        if self.fault_kind not in FAULT_KINDS:
            raise ConfigError(f"fault_kind must be one of {', '.join(FAULT_KINDS)}, got {self.fault_kind!r}")
        if self.token_ids not in TOKEN_ID_POLICIES:
            raise ConfigError(f"token_ids must be one of {', '.join(TOKEN_ID_POLICIES)}, got {self.token_ids!r}")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    """The name /v1/models lists and responses carry; None: derived from the model directory."""
    reject_unknown_model: bool = False
    """False: any requested model name is answered by the served model (clients send their own defaults)."""
    api_keys: tuple[str, ...] = ()
    """Bearer tokens accepted on /v1/*; empty: no authentication."""
    max_inputs_per_request: int = 2048
    max_body_bytes: int = 32 * 1024 * 1024
    log_level: str = "info"
    log_format: str = "plain"
    """plain text or one JSON object per line."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM: the longest wait for accepted requests to be answered before exiting."""
    otlp_endpoint: str | None = None
    """An OpenTelemetry collector's base URL (OTLP/HTTP protobuf to its /v1/traces; host:port for gRPC): each
    request's spans go there. None: no traces, and nothing of OpenTelemetry is imported."""
    otlp_service_name: str = "embedserve"
    otlp_protocol: str = "http/protobuf"
    """http/protobuf, or grpc (where opentelemetry-exporter-otlp-proto-grpc is installed)."""

    def __post_init__(self) -> None:
        _positive("max_inputs_per_request", self.max_inputs_per_request)
        _positive("max_body_bytes", self.max_body_bytes)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.log_format not in ("plain", "json"):
            raise ConfigError(f"log_format must be plain or json, got {self.log_format!r}")
        if self.otlp_protocol not in OTLP_PROTOCOLS:
            raise ConfigError(f"otlp_protocol must be one of {', '.join(OTLP_PROTOCOLS)}, got {self.otlp_protocol!r}")
        if not self.shutdown_grace_s > 0:
            raise ConfigError(f"shutdown_grace_s must be positive, got {self.shutdown_grace_s}")
        if any(not k for k in self.api_keys):
            raise ConfigError("an API key must not be empty")


@dataclass(frozen=True, kw_only=True)
class ServedModel:
    """One more model served beside the default one, under ``name``."""

    name: str
    engine: EngineConfig


@dataclass(frozen=True, kw_only=True)
class Config:
    engine: EngineConfig
    """The default model: served as ``server.served_model_name``; it answers requests that name no model."""
    server: ServerConfig = field(default_factory=ServerConfig)
    more_models: tuple[ServedModel, ...] = ()
    """Further models in the same process, routed by the request's ``model``; they share the device in turns."""

    def __post_init__(self) -> None:
        for cfg in [self.engine] + [m.engine for m in self.more_models]:
            if self.server.max_inputs_per_request > cfg.scheduler.max_queue:
                raise ConfigError(
                    f"max_inputs_per_request ({self.server.max_inputs_per_request}) exceeds max_queue "
                    f"({cfg.scheduler.max_queue}): such a request could never be queued"
                )
        names = [self.server.served_model_name] + [m.name for m in self.more_models]
        if self.more_models and len(set(names)) != len(names):
            raise ConfigError(f"served model names must differ, got {names}; name them with --model NAME=PATH")
