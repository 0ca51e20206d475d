"""GTE v1.5 and multilingual (gte-base-en-v1.5, gte-large-en-v1.5, gte-multilingual-base,
snowflake-arctic-embed-m-v2.0) over packed tokens.

A post-norm encoder with rotary positions: embeddings (word, plus token type where the config has types) ->
LayerNorm, then per layer attention with RoPE -> add -> LayerNorm -> gated MLP (``act(gate) * up``) -> add ->
LayerNorm. Attention and the MLP's down projection carry biases; the up and gate projections do not.

Two checkpoint spellings load: transformers' native ``GteModel`` (``layers.N.self_attn.q_proj`` ...,
``rope_parameters``) and the remote-code ``NewModel`` the published checkpoints were saved from
(``encoder.layer.N.attention.qkv_proj``, ``mlp.up_gate_proj`` with up first, ``attn_ln`` / ``mlp_ln``,
``rope_theta`` + ``rope_scaling`` ``{"type": "ntk"}``). The remote code itself never runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.attention import AttentionShape, varlen_attention
from embedserve.kernels.linear import LinearPlan, activate, project
from embedserve.models.encoder import EncoderBase, Kernels
from embedserve.models.layers import Embedding, activation
from embedserve.models.rope import RopeSpec, apply_rope, cos_sin


@dataclass(frozen=True, kw_only=True)
class GteArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int  # 0: no token type embeddings
    layer_norm_eps: float
    hidden_act: str
    rope: RopeSpec
    attention_bias: bool = True  # q/k/v/o biases (GTE: yes; NomicBERT: no)
    down_bias: bool = True

    @classmethod
    def from_hf_config(cls, cfg: dict) -> GteArgs:
        if cfg.get("position_embedding_type", "rope") != "rope":
            raise ModelLoadError(f"GTE with position_embedding_type {cfg['position_embedding_type']!r} is not "
                                 "supported (only 'rope')")
        if cfg.get("layer_norm_type", "layer_norm") != "layer_norm":
            raise ModelLoadError(f"GTE with layer_norm_type {cfg['layer_norm_type']!r} is not supported")
        if cfg.get("logn_attention_scale"):
            raise ModelLoadError("GTE with logn_attention_scale is not supported")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if hidden % heads:
            raise ModelLoadError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        # transformers' GteConfig default base is 160000; the remote NewConfig's rope_theta is always written.
        rope_cfg = cfg if "rope_parameters" in cfg or "rope_theta" in cfg else {**cfg, "rope_theta": 160_000.0}
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            type_vocab_size=cfg.get("type_vocab_size", 1) or 0,
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=cfg.get("hidden_act", "gelu"),
            rope=RopeSpec.from_hf_config(rope_cfg),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def attention_shape(self) -> AttentionShape:
        return AttentionShape(heads=self.num_heads, kv_heads=self.num_heads, head_dim=self.head_dim)


class GteLayer(nn.Module):
    def __init__(self, a: GteArgs) -> None:
        super().__init__()
        H, I = a.hidden_size, a.intermediate_size
        self.heads, self.head_dim = a.num_heads, a.head_dim
        self.qkv = nn.Linear(H, 3 * H, bias=a.attention_bias)
        self.o = nn.Linear(H, H, bias=a.attention_bias)
        self.attn_norm = nn.LayerNorm(H, eps=a.layer_norm_eps)
        self.up_gate = nn.Linear(H, 2 * I, bias=False)  # rows: up, then gate
        self.down = nn.Linear(I, H, bias=a.down_bias)
        self.mlp_norm = nn.LayerNorm(H, eps=a.layer_norm_eps)
        self.act = activation(a.hidden_act)

    def forward(
        self, h: torch.Tensor, attn, cos: torch.Tensor, sin: torch.Tensor, lb: LinearPlan | None
    ) -> torch.Tensor:
        T, H = h.shape
        q, k, v = project(h, self.qkv, plan=lb).view(T, 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = varlen_attention(q, k, v, attn, scale=self.head_dim**-0.5).reshape(T, H)
        h = self.attn_norm(h + project(a, self.o, plan=lb))
        up, gate = project(h, self.up_gate, plan=lb).chunk(2, dim=1)  # [T, I] each
        gated = activate(gate, self.act) * up
        return self.mlp_norm(h + project(gated, self.down, plan=lb))


class GteModel(EncoderBase):
    weight_prefixes = ("", "gte.", "new.", "model.")
    ignored_weights = (
        r"pooler\..*",
        r"lm_head\..*",
        r"classifier\..*",
        r"embeddings\.position_ids",
        r".*rotary_emb\..*",  # RoPE tables some remote-code versions saved: recomputed here
    )

    def __init__(self, args: GteArgs, kernels: Kernels = Kernels()) -> None:
        super().__init__(args, kernels)
        H = args.hidden_size
        self.word_embeddings = Embedding(args.vocab_size, H)
        self.token_type_embeddings = Embedding(args.type_vocab_size, H) if args.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(H, eps=args.layer_norm_eps)
        self.layers = nn.ModuleList(GteLayer(args) for _ in range(args.num_layers))

    @property
    def embedding_rows(self) -> int:
        return self.word_embeddings.weight.shape[0]

    def describe(self) -> str:
        a = self.args
        return (f"{type(self).__name__}: {a.num_layers} layers, global bidirectional attention, {a.num_heads} heads "
                f"of {a.head_dim}; {a.rope.describe()}; gated MLP ({a.hidden_act})")

    def weight_maps(self) -> list[dict[str, tuple[str, ...]]]:
        """The checkpoint spellings this model loads from, native first; the loader takes the one that fits."""
        return [self._names(native=True), self._names(native=False, packed=True),
                self._names(native=False, packed=False)]

    def _embedding_names(self) -> dict[str, tuple[str, ...]]:
        m = {
            "word_embeddings.weight": ("embeddings.word_embeddings.weight",),
            "embed_norm.weight": ("embeddings.LayerNorm.weight",),
            "embed_norm.bias": ("embeddings.LayerNorm.bias",),
        }
        if self.token_type_embeddings is not None:
            m["token_type_embeddings.weight"] = ("embeddings.token_type_embeddings.weight",)
        return m

    def _names(self, *, native: bool, packed: bool = True) -> dict[str, tuple[str, ...]]:
        a = self.args
        m = self._embedding_names()
        for i in range(a.num_layers):
            dst = f"layers.{i}."
            if native:
                src = f"layers.{i}."
                qkv = tuple(f"{src}self_attn.{n}_proj" for n in "qkv")
                o, up_gate = src + "self_attn.o_proj", (src + "mlp.up_proj", src + "mlp.gate_proj")
                down, attn_norm, mlp_norm = src + "mlp.down_proj", src + "post_attention_layernorm", src + "post_mlp_layernorm"
            else:
                src = f"encoder.layer.{i}."
                qkv = (src + "attention.qkv_proj",) if packed else tuple(f"{src}attention.{n}_proj" for n in "qkv")
                o, up_gate = src + "attention.o_proj", (src + "mlp.up_gate_proj",)
                down, attn_norm, mlp_norm = src + "mlp.down_proj", src + "attn_ln", src + "mlp_ln"
            m[dst + "qkv.weight"] = tuple(n + ".weight" for n in qkv)
            m[dst + "o.weight"] = (o + ".weight",)
            if a.attention_bias:
                m[dst + "qkv.bias"] = tuple(n + ".bias" for n in qkv)
                m[dst + "o.bias"] = (o + ".bias",)
            m[dst + "up_gate.weight"] = tuple(n + ".weight" for n in up_gate)
            m[dst + "down.weight"] = (down + ".weight",)
            if a.down_bias:
                m[dst + "down.bias"] = (down + ".bias",)
            for ours, theirs in (("attn_norm", attn_norm), ("mlp_norm", mlp_norm)):
                m[f"{dst}{ours}.weight"] = (theirs + ".weight",)
                m[f"{dst}{ours}.bias"] = (theirs + ".bias",)
        return m

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        return self.weight_maps()[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            h = h + self.token_type_embeddings.weight[0]  # single-segment inputs: token type 0 everywhere
        return self.embed_norm(h)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """``input_ids [T]``, ``positions [T]`` (0-based within each sequence) -> hidden ``[T, H]``."""
        a = self.args
        attn = self.kernels.attention_batch(cu_seqlens, max_seqlen, lengths=lengths)
        cos, sin = cos_sin(positions, a.rope.inv_freq_on(a.head_dim, input_ids.device), self.word_embeddings.weight.dtype)
        h = self.embed(input_ids)  # [T, H]
        for layer in self.layers:
            h = layer(h, attn, cos, sin, self.kernels.linear)
        return h
