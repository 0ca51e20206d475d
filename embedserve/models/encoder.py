"""What every encoder family offers, and the kernels it runs.

:class:`Encoder` is the protocol the engine and the runner hold a family to (BERT, DistilBERT, MPNet, ModernBERT,
GTE, NomicBERT, Llama / Mistral / Qwen2 / Qwen3, Gemma 3): the few properties they read, nothing else.
:class:`Kernels` is the one value that says which attention and linear kernels an encoder runs; the engine
chooses it at load (for this device, dtype and architecture) and hands it to the family's constructor.
:class:`EncoderBase` gives a family the parts that read the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from embedserve.kernels.attention import AttentionBatch, AttentionShape, prepare
from embedserve.kernels.linear import LinearPlan


@dataclass(frozen=True)
class Kernels:
    """The kernels one encoder runs. The defaults (dense attention, ``F.linear``) run anywhere; the engine
    chooses better ones at load."""

    attention: str = "dense"  # a backend of kernels.attention.select_backend
    solo_min: int | None = None  # sdpa_bucketed on the CPU: sequences this long or longer run one call each
    linear: LinearPlan | None = None  # None: F.linear everywhere
    attention_dtype: torch.dtype | None = None  # attention computes in it (None: the model's dtype)

    def attention_batch(self, cu_seqlens: torch.Tensor, max_seqlen: int, **kw: Any) -> AttentionBatch:
        """One pass's attention metadata for the chosen backend (``kw``: :func:`prepare`'s keywords)."""
        return prepare(self.attention, cu_seqlens, max_seqlen, solo_min=self.solo_min, dtype=self.attention_dtype,
                       **kw)


@runtime_checkable
class Encoder(Protocol):
    """An encoder over packed tokens: ``forward(input_ids [T], positions [T], cu_seqlens, max_seqlen, *,
    lengths=...)`` -> hidden states ``[T, hidden_size]``; families that take token types (BERT, GTE) accept
    ``token_types=``, families that chunk long inputs (``supports_chunking``) accept ``caches=`` and
    ``cu_seqlens_k=`` and offer ``new_cache(length, device)``."""

    causal: bool  # a decoder: each token sees only those before it (last-token pooling, LM heads)
    supports_chunking: ClassVar[bool]  # long inputs may run in chunks over a key cache
    hidden_tails: ClassVar[bool]  # forward takes tails=: per input, its last tokens that are never keys
    weight_prefixes: ClassVar[tuple[str, ...]]  # where checkpoints nest the encoder's tensors
    ignored_weights: ClassVar[tuple[str, ...]]  # checkpoint tensors an embedding forward never reads
    float16: ClassVar[bool]  # safe to run in float16 (Gemma 3's activations overflow it)
    kernels: Kernels

    @property
    def max_length(self) -> int:
        """Tokens of the longest input the positions allow."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def embedding_rows(self) -> int:
        """Token ids must be below this: an id past the table is a device-side assert on CUDA."""

    @property
    def token_type_rows(self) -> int:
        """Rows of the token-type table (BERT's segment ids); 0 where the family has none."""

    @property
    def attention_shape(self) -> AttentionShape: ...

    def describe(self) -> str:
        """The architecture in a line, for the start-up log."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                **kw: Any) -> torch.Tensor: ...


class EncoderBase(nn.Module):
    """What reads the same in every family: its arguments (a frozen dataclass with ``max_length``,
    ``hidden_size`` and ``attention_shape``) and its kernels, both fixed at construction."""

    causal = False
    supports_chunking = False
    hidden_tails = False  # forward takes tails= (a ColBERT query's expansion tokens that no token attends to)
    float16 = True  # its activations stay within float16's range
    # In bfloat16 on a CPU, its GEMMs and attention run bf16 while its residual stream, norms and embeddings stay
    # float32 (project() casts each GEMM's input): the families whose every matmul goes through project() and
    # whose positions are absolute (no RoPE tables mixing dtypes into q and k).
    fp32_residual = False

    def __init__(self, args: Any, kernels: Kernels) -> None:
        super().__init__()
        self.args = args
        self.kernels = kernels

    @property
    def max_length(self) -> int:
        return self.args.max_length

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def attention_shape(self) -> AttentionShape:
        return self.args.attention_shape

    @property
    def token_type_rows(self) -> int:
        table = getattr(self, "token_type_embeddings", None)
        return 0 if table is None else table.weight.shape[0]
