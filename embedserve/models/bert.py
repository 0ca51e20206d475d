"""BERT-family encoders over packed tokens: BERT (MiniLM, BGE, E5, GTE v1 ...), RoBERTa, XLM-RoBERTa.

RoBERTa and XLM-RoBERTa are BERT with positions offset by ``padding_idx + 1`` (transformers counts
positions from there for unpadded tokens) and usually a single token type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.attention import AttentionShape, varlen_attention
from embedserve.kernels.linear import LinearPlan, project
from embedserve.models.encoder import EncoderBase, Kernels
from embedserve.models.layers import Embedding, activation


@dataclass(frozen=True, kw_only=True)
class BertArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_offset: int  # 0 for BERT; padding_idx + 1 for RoBERTa / XLM-RoBERTa
    relative_bias: bool = False  # MPNet: a per-head bias by relative position

    @classmethod
    def from_hf_config(cls, cfg: dict) -> BertArgs:
        kind = cfg.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ModelLoadError(f"position_embedding_type {kind!r} is not supported (only 'absolute')")
        roberta = cfg.get("model_type") in ("roberta", "xlm-roberta", "camembert")
        offset = cfg.get("pad_token_id", 1) + 1 if roberta else 0
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if hidden % heads:
            raise ModelLoadError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=cfg.get("hidden_act", "gelu"),
            position_offset=offset,
        )

    @property
    def max_length(self) -> int:
        """Longest sequence the position table can hold."""
        return self.max_position_embeddings - self.position_offset

    @property
    def attention_shape(self) -> AttentionShape:
        h = self.num_heads
        return AttentionShape(heads=h, kv_heads=h, head_dim=self.hidden_size // h, relative_bias=self.relative_bias)


class BertLayer(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        H = a.hidden_size
        self.heads, self.head_dim = a.num_heads, H // a.num_heads
        self.qkv = nn.Linear(H, 3 * H)
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=a.layer_norm_eps)
        self.up = nn.Linear(H, a.intermediate_size)
        self.down = nn.Linear(a.intermediate_size, H)
        self.mlp_norm = nn.LayerNorm(H, eps=a.layer_norm_eps)
        self.act = activation(a.hidden_act)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, h: torch.Tensor, attn, lb: LinearPlan | None) -> torch.Tensor:
        T, H = h.shape
        qkv = project(h, self.qkv, plan=lb)  # [T, 3H]
        q, k, v = qkv.view(T, 3, self.heads, self.head_dim).unbind(1)  # 3 x [T, nh, d]
        a = varlen_attention(q, k, v, attn, scale=self.scale).reshape(T, H)  # [T, H]
        h = self.attn_norm(h + project(a, self.attn_out, plan=lb))
        up = project(h, self.up, self.act, lb)  # [T, I]
        return self.mlp_norm(h + project(up, self.down, plan=lb))


class BertModel(EncoderBase):
    hidden_tails = True
    fp32_residual = True
    # Checkpoints saved from *ForMaskedLM etc. nest the encoder under a prefix.
    weight_prefixes = ("", "bert.", "roberta.", "model.")
    # Tensors a checkpoint may carry that an embedding forward does not use.
    ignored_weights = (
        r"pooler\..*",
        r"embeddings\.position_ids",
        r"embeddings\.token_type_ids",
        r"cls\..*",
        r"lm_head\..*",
        r"(bert|roberta)\.pooler\..*",
    )

    def __init__(self, args: BertArgs, kernels: Kernels = Kernels()) -> None:
        super().__init__(args, kernels)
        H = args.hidden_size
        self.word_embeddings = Embedding(args.vocab_size, H)
        self.position_embeddings = Embedding(args.max_position_embeddings, H)
        self.token_type_embeddings = Embedding(args.type_vocab_size, H)
        self.embed_norm = nn.LayerNorm(H, eps=args.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(args) for _ in range(args.num_layers))

    @property
    def embedding_rows(self) -> int:
        """Token ids must be below this: an id past the table is a device-side assert on CUDA."""
        return self.word_embeddings.weight.shape[0]

    def describe(self) -> str:
        """The architecture in a line, for the start-up log."""
        a = self.args
        return (f"{type(self).__name__}: {a.num_layers} layers, global bidirectional attention, {a.num_heads} heads; "
                f"absolute positions (offset {a.position_offset}), no RoPE")

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor | None = None
              ) -> torch.Tensor:
        # Single texts: token type 0 everywhere; (query, document) pairs: 1 from the document on.
        types = self.token_type_embeddings.weight[0] if token_types is None else self.token_type_embeddings(token_types)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions + self.args.position_offset) + types

    def attention_batch(self, cu_seqlens: torch.Tensor, max_seqlen: int, lengths: list[int] | None):
        return self.kernels.attention_batch(cu_seqlens, max_seqlen, lengths=lengths)

    # Our layer's tensors -> the checkpoint's, per layer (the q/k/v parts are stacked into qkv).
    LAYER_NAMES = {
        "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attn_out": ("attention.output.dense",),
        "attn_norm": ("attention.output.LayerNorm",),
        "up": ("intermediate.dense",),
        "down": ("output.dense",),
        "mlp_norm": ("output.LayerNorm",),
    }
    LAYER_PREFIX = "encoder.layer"

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        m = {name + ".weight": ("embeddings." + theirs + ".weight",) for name, theirs in (
            ("word_embeddings", "word_embeddings"), ("position_embeddings", "position_embeddings"),
            ("token_type_embeddings", "token_type_embeddings"), ("embed_norm", "LayerNorm"))
            if hasattr(self, name)}
        m["embed_norm.bias"] = ("embeddings.LayerNorm.bias",)
        for i in range(self.args.num_layers):
            src, dst = f"{self.LAYER_PREFIX}.{i}.", f"layers.{i}."
            for ours, theirs in self.LAYER_NAMES.items():
                for p in ("weight", "bias"):
                    m[f"{dst}{ours}.{p}"] = tuple(f"{src}{t}.{p}" for t in theirs)
        return m

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
        lengths: list[int] | None = None, token_types: torch.Tensor | None = None, tails: list[int] | None = None,
    ) -> torch.Tensor:
        """``input_ids [T]``, ``positions [T]`` (0-based within each sequence) -> hidden ``[T, H]``.
        ``lengths``: the sequences' lengths on the host (what ``cu_seqlens`` encodes), so that nothing waits on
        the device. ``token_types [T]``: for pairs (a cross-encoder's query and document). ``tails``: hidden
        tails (:func:`~embedserve.kernels.attention.prepare`)."""
        if tails is None:
            attn = self.attention_batch(cu_seqlens, max_seqlen, lengths)
        else:
            attn = self.kernels.attention_batch(cu_seqlens, max_seqlen, lengths=lengths, tails=tails)
        if token_types is None:
            h = self.embed_norm(self.embed(input_ids, positions))  # [T, H]
        else:
            h = self.embed_norm(self.embed(input_ids, positions, token_types.long()))
        for layer in self.layers:
            h = layer(h, attn, self.kernels.linear)
        return h
