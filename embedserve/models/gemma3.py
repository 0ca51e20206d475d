"""Gemma 3 text models over packed tokens, as EmbeddingGemma uses them.

Differences from the Llama family, all read from the config: embeddings scaled by sqrt(hidden_size) (in the
weights' dtype), RMSNorm that scales by ``1 + weight`` in fp32, a norm after attention and after the MLP as
well as before each, q/k RMSNorm, attention scaled by ``query_pre_attn_scalar ** -0.5``, a GELU-tanh gated
MLP, and layers alternating between sliding-window and global attention, each with its own RoPE base.
``use_bidirectional_attention`` (EmbeddingGemma) makes every layer bidirectional, the sliding ones over
``|i - j| < sliding_window // 2 + 1`` (transformers stores the full width and halves it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.attention import AttentionShape, varlen_attention
from embedserve.kernels.linear import LinearPlan, project
from embedserve.models.encoder import EncoderBase, Kernels
from embedserve.models.layers import Embedding, attention_runs, rms_norm
from embedserve.models.rope import RopeSpec, apply_rope, cos_sin

SLIDING, FULL = "sliding_attention", "full_attention"


def _layer_types(cfg: dict, num_layers: int) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if not types:
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {SLIDING, FULL}:
        raise ModelLoadError(f"layer_types must name {num_layers} layers as {SLIDING} or {FULL}, got {types}")
    return tuple(types)


def _rope_for(cfg: dict, layer_type: str) -> RopeSpec:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        return RopeSpec.from_hf_config(cfg, layer_type)
    if layer_type == SLIDING:  # older configs: a plain local base, never scaled
        return RopeSpec(theta=float(cfg.get("rope_local_base_freq", 10000.0)))
    return RopeSpec.from_hf_config(cfg)


@dataclass(frozen=True, kw_only=True)
class Gemma3Args:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    attention_bias: bool
    query_pre_attn_scalar: float
    sliding_window: int | None
    layer_types: tuple[str, ...]
    causal: bool
    rope: dict[str, RopeSpec]

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Gemma3Args:
        if cfg.get("attn_logit_softcapping") is not None:
            raise ModelLoadError(f"attn_logit_softcapping={cfg['attn_logit_softcapping']} is not supported")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise ModelLoadError(f"hidden_activation {act!r} is not supported for Gemma 3 (gelu_pytorch_tanh)")
        layers = cfg["num_hidden_layers"]
        types = _layer_types(cfg, layers)
        heads = cfg["num_attention_heads"]
        bidirectional = bool(cfg.get("use_bidirectional_attention", False))
        window = cfg.get("sliding_window")
        if bidirectional and window:
            # transformers halves the stored window for bidirectional layers: a token sees |i - j| < w // 2 + 1.
            window = window // 2 + 1
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 131072),
            attention_bias=bool(cfg.get("attention_bias", False)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg.get("head_dim") or 256),
            sliding_window=window,
            layer_types=types,
            causal=not bidirectional,
            rope={t: _rope_for(cfg, t) for t in set(types)},
        )

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def attention_shape(self) -> AttentionShape:
        return AttentionShape(heads=self.num_heads, kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                              causal=self.causal, window=SLIDING in self.layer_types)


class Gemma3Layer(nn.Module):
    def __init__(self, a: Gemma3Args) -> None:
        super().__init__()
        H, d = a.hidden_size, a.head_dim
        self.heads, self.kv_heads, self.head_dim, self.eps = a.num_heads, a.num_kv_heads, d, a.rms_norm_eps
        self.scale = a.query_pre_attn_scalar**-0.5
        self.input_norm = nn.Parameter(torch.empty(H))
        self.post_attn_norm = nn.Parameter(torch.empty(H))
        self.pre_mlp_norm = nn.Parameter(torch.empty(H))
        self.post_mlp_norm = nn.Parameter(torch.empty(H))
        self.qkv = nn.Linear(H, (a.num_heads + 2 * a.num_kv_heads) * d, bias=a.attention_bias)
        self.q_norm = nn.Parameter(torch.empty(d))
        self.k_norm = nn.Parameter(torch.empty(d))
        self.o = nn.Linear(a.num_heads * d, H, bias=a.attention_bias)
        self.gate_up = nn.Linear(H, 2 * a.intermediate_size, bias=False)
        self.down = nn.Linear(a.intermediate_size, H, bias=False)

    def forward(
        self, h: torch.Tensor, attn, cos: torch.Tensor, sin: torch.Tensor, lb: LinearPlan | None
    ) -> torch.Tensor:
        T = h.shape[0]
        d, eps = self.head_dim, self.eps
        x = rms_norm(h, self.input_norm, eps, plus_one=True)
        qkv = project(x, self.qkv, plan=lb)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=1)
        q = rms_norm(q.view(T, self.heads, d), self.q_norm, eps, plus_one=True)
        k = rms_norm(k.view(T, self.kv_heads, d), self.k_norm, eps, plus_one=True)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = varlen_attention(q, k, v.view(T, self.kv_heads, d), attn, scale=self.scale).reshape(T, self.heads * d)
        h = h + rms_norm(project(a, self.o, plan=lb), self.post_attn_norm, eps, plus_one=True)
        x = rms_norm(h, self.pre_mlp_norm, eps, plus_one=True)
        gate, up = project(x, self.gate_up, plan=lb).chunk(2, dim=1)
        y = project(F.gelu(gate, approximate="tanh") * up, self.down, plan=lb)
        return h + rms_norm(y, self.post_mlp_norm, eps, plus_one=True)


class Gemma3Model(EncoderBase):
    float16 = False  # activations grow past float16's 65504 (transformers warns the same): bf16 or fp32
    weight_prefixes = ("", "model.", "model.language_model.")
    ignored_weights = (r"lm_head\..*", r".*rotary_emb.*\.inv_freq")

    def __init__(self, args: Gemma3Args, kernels: Kernels = Kernels()) -> None:
        super().__init__(args, kernels)
        self.causal = args.causal
        self.embed = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Gemma3Layer(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.empty(args.hidden_size))

    @property
    def embedding_rows(self) -> int:
        return self.embed.weight.shape[0]

    def describe(self) -> str:
        """The architecture in a line, for the start-up log: attention per layer and the RoPE per layer type."""
        a = self.args
        kind = "causal" if a.causal else "bidirectional"
        per_layer = [a.sliding_window if t == SLIDING else None for t in a.layer_types]
        ropes = "; ".join(f"{'sliding' if t == SLIDING else 'global'} layers {a.rope[t].describe()}"
                          for t in sorted(set(a.layer_types)))
        return (f"{type(self).__name__}: {a.num_layers} layers, {attention_runs(per_layer, kind)}; "
                f"{a.num_heads} query / "
                f"{a.num_kv_heads} key-value heads of {a.head_dim}; {ropes}")

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        a = self.args
        m = {"embed.weight": ("embed_tokens.weight",), "norm": ("norm.weight",)}
        for i in range(a.num_layers):
            src, dst = f"layers.{i}.", f"layers.{i}."
            m[dst + "input_norm"] = (src + "input_layernorm.weight",)
            m[dst + "post_attn_norm"] = (src + "post_attention_layernorm.weight",)
            m[dst + "pre_mlp_norm"] = (src + "pre_feedforward_layernorm.weight",)
            m[dst + "post_mlp_norm"] = (src + "post_feedforward_layernorm.weight",)
            m[dst + "qkv.weight"] = tuple(src + f"self_attn.{p}_proj.weight" for p in "qkv")
            m[dst + "o.weight"] = (src + "self_attn.o_proj.weight",)
            if a.attention_bias:
                m[dst + "qkv.bias"] = tuple(src + f"self_attn.{p}_proj.bias" for p in "qkv")
                m[dst + "o.bias"] = (src + "self_attn.o_proj.bias",)
            m[dst + "q_norm"] = (src + "self_attn.q_norm.weight",)
            m[dst + "k_norm"] = (src + "self_attn.k_norm.weight",)
            m[dst + "gate_up.weight"] = (src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight")
            m[dst + "down.weight"] = (src + "mlp.down_proj.weight",)
        return m

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """``input_ids [T]``, ``positions [T]`` (0-based within each sequence) -> hidden ``[T, H]``.
        ``lengths``: the host copy of the sequence lengths (nothing then waits on the device)."""
        a = self.args
        dtype = self.embed.weight.dtype
        batches, rope = {}, {}
        for t in set(a.layer_types):
            window = a.sliding_window if t == SLIDING else None
            batches[t] = self.kernels.attention_batch(cu_seqlens, max_seqlen, causal=a.causal, window=window,
                                                      lengths=lengths)
            rope[t] = cos_sin(positions, a.rope[t].inv_freq_on(a.head_dim, input_ids.device), dtype)
        # The scale is rounded to the weights' dtype first, as transformers does.
        h = self.embed(input_ids) * torch.tensor(a.hidden_size**0.5, dtype=dtype)  # [T, H]
        for layer, t in zip(self.layers, a.layer_types):
            h = layer(h, batches[t], *rope[t], self.kernels.linear)
        return rms_norm(h, self.norm, a.rms_norm_eps, plus_one=True)
