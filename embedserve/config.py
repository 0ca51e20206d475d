"""Configuration: frozen keyword-only dataclasses, validated once when built. stdlib only.

cli.py builds the tree from flags and EMBEDSERVE_* variables; everything else receives it explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedserve.errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("auto", "torch_varlen", "flash_attn", "sdpa", "sdpa_bucketed", "sdpa_segments", "dense")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str
    """A local Hugging Face / sentence-transformers model directory."""
    dtype: str = "auto"
    """auto: float32 on CPU (exact), bfloat16 on CUDA."""
    device: str = "auto"
    """auto: cuda if available, else cpu."""
    attention: str = "auto"
    """Varlen attention backend; auto picks the fastest available for the device."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_batch_tokens: int | None = None
    """Tokens packed into one forward pass; None: 16384 on CUDA, 4096 on CPU."""
    max_batch_requests: int = 512
    """Inputs (sequences) packed into one forward pass."""
    max_queue: int = 16384
    """Inputs waiting or running; beyond it new requests are refused with 429."""

    def __post_init__(self) -> None:
        _positive("max_batch_tokens", self.max_batch_tokens)
        _positive("max_batch_requests", self.max_batch_requests)
        _positive("max_queue", self.max_queue)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: ModelConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    truncate: bool = True
    """Cut inputs longer than the model's maximum (as sentence-transformers does); False: refuse them."""
    tokenizer_workers: int = 2
    """Threads that tokenize off the event loop."""

    def __post_init__(self) -> None:
        _positive("tokenizer_workers", self.tokenizer_workers)
