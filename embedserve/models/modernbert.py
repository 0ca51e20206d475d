"""ModernBERT (gte-modernbert-base, modernbert-embed, Alibaba's and Nomic's ModernBERT embedders) over packed
tokens.

Pre-norm encoder layers without biases (by default), RoPE with one base for global layers and another for local
ones, bidirectional attention that alternates: every ``global_attn_every_n_layers``-th layer (the first among
them) attends globally, the others within ``local_attention`` tokens (``local_attention // 2`` each side,
inclusive), a GeGLU MLP (``act(input) * gate``), a LayerNorm after the embeddings and at the end. The first
layer's attention norm is the identity. Both config spellings are read: transformers 5's ``layer_types`` and
``rope_parameters``, and the published checkpoints' ``global_attn_every_n_layers``, ``global_rope_theta`` and
``local_rope_theta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.attention import AttentionShape, varlen_attention
from embedserve.kernels.linear import LinearPlan, activate, project
from embedserve.models.encoder import EncoderBase, Kernels
from embedserve.models.layers import Embedding, activation, attention_runs
from embedserve.models.rope import RopeSpec, apply_rope, cos_sin

SLIDING, FULL = "sliding_attention", "full_attention"
_THETA = {FULL: ("global_rope_theta", 160_000.0), SLIDING: ("local_rope_theta", 10_000.0)}


def _layer_types(cfg: dict, layers: int) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if not types:
        every = cfg.get("global_attn_every_n_layers", 3)
        types = [SLIDING if i % every else FULL for i in range(layers)]
    if len(types) != layers or set(types) - {SLIDING, FULL}:
        raise ModelLoadError(f"layer_types must list {layers} of {FULL!r} / {SLIDING!r}, got {types!r}")
    return tuple(types)


def _rope(cfg: dict, layer_type: str) -> RopeSpec:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict) and "rope_theta" in params[layer_type]:
        return RopeSpec.from_hf_config(cfg, layer_type)
    key, default = _THETA[layer_type]
    return RopeSpec.from_hf_config({**cfg, "rope_parameters": None, "rope_theta": cfg.get(key, default)})


@dataclass(frozen=True, kw_only=True)
class ModernBertArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    window: int  # tokens a local layer's token may see on each side, itself excluded, plus one: |i - j| < window
    layer_types: tuple[str, ...]
    rope: dict[str, RopeSpec]

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModernBertArgs:
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if hidden % heads:
            raise ModelLoadError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        layers = cfg["num_hidden_layers"]
        types = _layer_types(cfg, layers)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            norm_eps=cfg.get("norm_eps", 1e-5),
            norm_bias=bool(cfg.get("norm_bias", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            hidden_act=cfg.get("hidden_activation", "gelu"),
            # transformers: |i - j| <= local_attention // 2 on a local layer.
            window=cfg.get("local_attention", 128) // 2 + 1,
            layer_types=types,
            rope={t: _rope(cfg, t) for t in set(types)},
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def attention_shape(self) -> AttentionShape:
        return AttentionShape(heads=self.num_heads, kv_heads=self.num_heads, head_dim=self.head_dim,
                              window=SLIDING in self.layer_types)


class ModernBertLayer(nn.Module):
    def __init__(self, a: ModernBertArgs, first: bool) -> None:
        super().__init__()
        H = a.hidden_size
        self.heads, self.head_dim = a.num_heads, a.head_dim
        self.attn_norm = None if first else nn.LayerNorm(H, eps=a.norm_eps, bias=a.norm_bias)
        self.qkv = nn.Linear(H, 3 * H, bias=a.attention_bias)
        self.o = nn.Linear(H, H, bias=a.attention_bias)
        self.mlp_norm = nn.LayerNorm(H, eps=a.norm_eps, bias=a.norm_bias)
        self.wi = nn.Linear(H, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.wo = nn.Linear(a.intermediate_size, H, bias=a.mlp_bias)
        self.act = activation(a.hidden_act)

    def forward(
        self, h: torch.Tensor, attn, cos: torch.Tensor, sin: torch.Tensor, lb: LinearPlan | None
    ) -> torch.Tensor:
        T, H = h.shape
        x = h if self.attn_norm is None else self.attn_norm(h)
        q, k, v = project(x, self.qkv, plan=lb).view(T, 3, self.heads, self.head_dim).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = varlen_attention(q, k, v, attn, scale=self.head_dim**-0.5).reshape(T, H)
        h = h + project(a, self.o, plan=lb)
        up, gate = project(self.mlp_norm(h), self.wi, plan=lb).chunk(2, dim=1)  # [T, I] each
        return h + project(activate(up, self.act) * gate, self.wo, plan=lb)


class ModernBertModel(EncoderBase):
    hidden_tails = True
    weight_prefixes = ("", "model.")
    ignored_weights = (r"head\..*", r"decoder\..*", r"classifier\..*", r"drop\..*")

    def __init__(self, args: ModernBertArgs, kernels: Kernels = Kernels()) -> None:
        super().__init__(args, kernels)
        H = args.hidden_size
        self.embed = Embedding(args.vocab_size, H)
        self.embed_norm = nn.LayerNorm(H, eps=args.norm_eps, bias=args.norm_bias)
        self.layers = nn.ModuleList(ModernBertLayer(args, i == 0) for i in range(args.num_layers))
        self.final_norm = nn.LayerNorm(H, eps=args.norm_eps, bias=args.norm_bias)

    @property
    def embedding_rows(self) -> int:
        return self.embed.weight.shape[0]

    def describe(self) -> str:
        a = self.args
        per_layer = [a.window if t == SLIDING else None for t in a.layer_types]
        ropes = "; ".join(f"{'local' if t == SLIDING else 'global'} layers {a.rope[t].describe()}"
                          for t in sorted(set(a.layer_types)))
        return (f"{type(self).__name__}: {a.num_layers} layers, {attention_runs(per_layer, 'bidirectional')}; "
                f"{a.num_heads} heads of {a.head_dim}; {ropes}")

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        a = self.args
        m = {"embed.weight": ("embeddings.tok_embeddings.weight",)}
        norms = {"embed_norm": "embeddings.norm", "final_norm": "final_norm"}
        for i in range(a.num_layers):
            src, dst = f"layers.{i}.", f"layers.{i}."
            if i:
                norms[dst + "attn_norm"] = src + "attn_norm"
            norms[dst + "mlp_norm"] = src + "mlp_norm"
            m[dst + "qkv.weight"] = (src + "attn.Wqkv.weight",)
            m[dst + "o.weight"] = (src + "attn.Wo.weight",)
            m[dst + "wi.weight"] = (src + "mlp.Wi.weight",)
            m[dst + "wo.weight"] = (src + "mlp.Wo.weight",)
            if a.attention_bias:
                m[dst + "qkv.bias"] = (src + "attn.Wqkv.bias",)
                m[dst + "o.bias"] = (src + "attn.Wo.bias",)
            if a.mlp_bias:
                m[dst + "wi.bias"] = (src + "mlp.Wi.bias",)
                m[dst + "wo.bias"] = (src + "mlp.Wo.bias",)
        for dst, src in norms.items():
            m[dst + ".weight"] = (src + ".weight",)
            if a.norm_bias:
                m[dst + ".bias"] = (src + ".bias",)
        return m

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
        lengths: list[int] | None = None, tails: list[int] | None = None,
    ) -> torch.Tensor:
        """``input_ids [T]``, ``positions [T]`` (0-based within each sequence) -> hidden ``[T, H]``. ``tails``:
        hidden tails (:func:`~embedserve.kernels.attention.prepare`)."""
        a = self.args
        dtype = self.embed.weight.dtype
        batches, rope = {}, {}
        for t in set(a.layer_types):
            batches[t] = self.kernels.attention_batch(cu_seqlens, max_seqlen, window=a.window if t == SLIDING else None,
                                                      lengths=lengths, tails=tails)
            rope[t] = cos_sin(positions, a.rope[t].inv_freq_on(a.head_dim, input_ids.device), dtype)
        h = self.embed_norm(self.embed(input_ids))  # [T, H]
        for layer, t in zip(self.layers, a.layer_types):
            h = layer(h, batches[t], *rope[t], self.kernels.linear)
        return self.final_norm(h)
