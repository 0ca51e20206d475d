"""MPNet (all-mpnet-base-v2, multi-qa-mpnet-base, paraphrase-mpnet) over packed tokens.

BERT's post-norm encoder layer (``bert.BertLayer``) with RoBERTa-style absolute positions (counted from
``padding_idx + 1`` = 2), no token types, and a relative position bias shared by every layer: each head adds a
learnt score per bucket of the query-key distance (T5's buckets: exact up to 8 tokens each way, logarithmic up
to 128, one bucket beyond). transformers computes the buckets with 32 of them whatever the config says, and so
does this file. The bias rules out the flash kernels; the SDPA backends take it as a float mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from embedserve.errors import ModelLoadError
from embedserve.kernels.attention import AttentionShape
from embedserve.models.bert import BertArgs, BertModel
from embedserve.models.encoder import Kernels
from embedserve.models.layers import Embedding

BUCKETS = 32  # transformers' MPNetEncoder.compute_position_bias: num_buckets=32 regardless of the config
MAX_DISTANCE = 128
PADDING_IDX = 1  # MPNetEmbeddings hard-codes it; positions start at PADDING_IDX + 1


def relative_buckets(rel: torch.Tensor, buckets: int = BUCKETS, max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bucket of each relative position ``rel`` (key minus query), bidirectional: half the buckets for keys
    before the query, half for keys at or after it."""
    half = buckets // 2
    n = -rel
    out = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    far = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return out + torch.where(n < exact, n, far.clamp(max=half - 1))


@dataclass(frozen=True, kw_only=True)
class MPNetArgs:
    bert: BertArgs
    relative_attention_num_buckets: int

    @classmethod
    def from_hf_config(cls, cfg: dict) -> MPNetArgs:
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if hidden % heads:
            raise ModelLoadError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        rows = cfg.get("relative_attention_num_buckets", 32)
        if rows < BUCKETS:
            raise ModelLoadError(f"MPNet with relative_attention_num_buckets {rows} is not supported: buckets are "
                                 f"computed for {BUCKETS}, as transformers does")
        bert = BertArgs(
            vocab_size=cfg["vocab_size"], hidden_size=hidden, num_layers=cfg["num_hidden_layers"], num_heads=heads,
            intermediate_size=cfg["intermediate_size"], max_position_embeddings=cfg.get("max_position_embeddings", 514),
            type_vocab_size=1, layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), hidden_act=cfg.get("hidden_act", "gelu"),
            position_offset=PADDING_IDX + 1, relative_bias=True,
        )
        return cls(bert=bert, relative_attention_num_buckets=rows)

    @property
    def max_length(self) -> int:
        return self.bert.max_length

    @property
    def attention_shape(self) -> AttentionShape:
        return self.bert.attention_shape


class MPNetModel(BertModel):
    hidden_tails = False  # its relative bias would need the hidden tails' positions
    weight_prefixes = ("", "mpnet.")
    ignored_weights = (
        r"pooler\..*",
        r"embeddings\.position_ids",
        r"lm_head\..*",
        r"classifier\..*",
    )

    def __init__(self, args: MPNetArgs, kernels: Kernels = Kernels()) -> None:
        super().__init__(args.bert, kernels)
        del self.token_type_embeddings  # MPNet has none
        self.relative_attention_bias = Embedding(args.relative_attention_num_buckets, args.bert.num_heads)

    def describe(self) -> str:
        a = self.args
        return (f"{type(self).__name__}: {a.num_layers} layers, global bidirectional attention, {a.num_heads} heads; "
                f"absolute positions (offset {a.position_offset}) plus a relative position bias ({BUCKETS} buckets, "
                f"max distance {MAX_DISTANCE}), no RoPE")

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids) + self.position_embeddings(positions + self.args.position_offset)

    def attention_batch(self, cu_seqlens: torch.Tensor, max_seqlen: int, lengths: list[int] | None):
        rel = torch.arange(1 - max_seqlen, max_seqlen, device=cu_seqlens.device)  # key minus query
        table = self.relative_attention_bias(relative_buckets(rel)).t()  # [H, 2 * max_seqlen - 1]
        return self.kernels.attention_batch(cu_seqlens, max_seqlen, lengths=lengths, rel_bias=table)

    LAYER_NAMES = {
        "qkv": ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
        "attn_out": ("attention.attn.o",),
        "attn_norm": ("attention.LayerNorm",),
        "up": ("intermediate.dense",),
        "down": ("output.dense",),
        "mlp_norm": ("output.LayerNorm",),
    }

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        return {**super().weight_map(), "relative_attention_bias.weight": ("encoder.relative_attention_bias.weight",)}
