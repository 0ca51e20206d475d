"""Llama-style decoders over packed tokens: Llama, Mistral, Qwen2, Qwen3.

One block shape covers the family: RMSNorm -> attention with RoPE and GQA -> RMSNorm -> SwiGLU MLP, a final
RMSNorm. What differs is read from the config: Qwen2 has q/k/v biases, Qwen3 RMS-normalises q and k per head
before RoPE, Mistral (and Qwen2 with ``use_sliding_window``) attends within a sliding window, and Llama 3
scales RoPE. Attention is causal, as these models were trained; embedding heads (last-token or mean
pooling) come from the sentence-transformers modules.
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
from embedserve.models.layers import Embedding, activation, attention_runs, rms_norm
from embedserve.models.rope import RopeSpec, apply_rope, cos_sin


def _layer_windows(cfg: dict, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types and len(types) != num_layers:
        raise ModelLoadError(f"layer_types has {len(types)} entries for {num_layers} layers")
    if cfg.get("model_type") in ("qwen2", "qwen3"):
        # transformers builds layer_types from use_sliding_window / max_window_layers for these.
        if not cfg.get("use_sliding_window") or not window:
            return (None,) * num_layers
        if not types:
            first = cfg.get("max_window_layers", num_layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window if window else None,) * num_layers


@dataclass(frozen=True, kw_only=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    windows: tuple[int | None, ...]
    rope: RopeSpec

    @classmethod
    def from_hf_config(cls, cfg: dict) -> LlamaArgs:
        model_type = cfg.get("model_type")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ModelLoadError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        attention_bias = bool(cfg.get("attention_bias", False))
        layers = cfg["num_hidden_layers"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_act", "silu"),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            windows=_layer_windows(cfg, layers),
            rope=RopeSpec.from_hf_config(cfg),
        )

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def attention_shape(self) -> AttentionShape:
        return AttentionShape(heads=self.num_heads, kv_heads=self.num_kv_heads, head_dim=self.head_dim, causal=True,
                              window=any(w is not None for w in self.windows), chunked=True)


@dataclass
class KVCache:
    """The keys and values of one long input, filled chunk by chunk. ``[layers, length, kv_heads, head_dim]``."""

    k: torch.Tensor
    v: torch.Tensor
    filled: int = 0  # tokens whose keys are in the cache: the next chunk's first position


class _Prefixes:
    """Per forward pass: where each sequence's chunk sits in the packed queries, and its cache if any."""

    def __init__(self, caches: list[KVCache | None], lengths: list[int]) -> None:
        self.caches = caches
        self.lengths = lengths
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        self.starts = starts
        # Runs of consecutive uncached sequences are copied as one slice.
        self.runs: list[tuple[int, int, KVCache | None]] = []
        for i, (start, n, c) in enumerate(zip(starts, lengths, caches)):
            if c is None and self.runs and self.runs[-1][2] is None:
                s0, n0, _ = self.runs[-1]
                self.runs[-1] = (s0, n0 + n, None)
            else:
                self.runs.append((start, n, c))

    def keys_and_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunks' new keys in their caches and return the packed keys/values each query sees."""
        ks, vs = [], []
        for start, n, c in self.runs:
            if c is None:
                ks.append(k[start : start + n])
                vs.append(v[start : start + n])
            else:
                end = c.filled + n
                c.k[layer, c.filled : end] = k[start : start + n]
                c.v[layer, c.filled : end] = v[start : start + n]
                ks.append(c.k[layer, :end])
                vs.append(c.v[layer, :end])
        return torch.cat(ks), torch.cat(vs)


class LlamaLayer(nn.Module):
    def __init__(self, a: LlamaArgs) -> None:
        super().__init__()
        H, d = a.hidden_size, a.head_dim
        self.heads, self.kv_heads, self.head_dim, self.eps = a.num_heads, a.num_kv_heads, d, a.rms_norm_eps
        self.attn_norm = nn.Parameter(torch.empty(H))
        self.qkv = nn.Linear(H, (a.num_heads + 2 * a.num_kv_heads) * d, bias=a.qkv_bias)
        self.q_norm = nn.Parameter(torch.empty(d)) if a.qk_norm else None
        self.k_norm = nn.Parameter(torch.empty(d)) if a.qk_norm else None
        self.o = nn.Linear(a.num_heads * d, H, bias=a.o_bias)
        self.mlp_norm = nn.Parameter(torch.empty(H))
        self.gate_up = nn.Linear(H, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.down = nn.Linear(a.intermediate_size, H, bias=a.mlp_bias)
        self.act = activation(a.hidden_act)
        if self.act != "silu":
            raise ModelLoadError(f"hidden_act {a.hidden_act!r} is not supported for this family (silu only)")

    def forward(
        self, h: torch.Tensor, attn, cos: torch.Tensor, sin: torch.Tensor, lb: LinearPlan | None,
        prefixes: _Prefixes | None = None, index: int = 0,
    ) -> torch.Tensor:
        T = h.shape[0]
        d = self.head_dim
        x = rms_norm(h, self.attn_norm, self.eps)
        qkv = project(x, self.qkv, plan=lb)  # [T, (nq + 2 nkv) d]
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=1)
        q = q.view(T, self.heads, d)
        k = k.view(T, self.kv_heads, d)
        v = v.view(T, self.kv_heads, d)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if prefixes is not None:
            k, v = prefixes.keys_and_values(index, k, v)  # [Tk, nkv, d]: cached prefixes + this step's keys
        a = varlen_attention(q, k, v, attn, scale=d**-0.5).reshape(T, self.heads * d)
        h = h + project(a, self.o, plan=lb)
        x = rms_norm(h, self.mlp_norm, self.eps)
        gate, up = project(x, self.gate_up, plan=lb).chunk(2, dim=1)  # [T, I] each
        return h + project(F.silu(gate) * up, self.down, plan=lb)


class LlamaModel(EncoderBase):
    causal = True
    supports_chunking = True
    weight_prefixes = ("", "model.")
    ignored_weights = (r"lm_head\..*", r".*rotary_emb\.inv_freq", r"score\..*")

    def __init__(self, args: LlamaArgs, kernels: Kernels = Kernels()) -> None:
        super().__init__(args, kernels)
        self.embed = Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.empty(args.hidden_size))

    @property
    def embedding_rows(self) -> int:
        return self.embed.weight.shape[0]

    def describe(self) -> str:
        """The architecture in a line, for the start-up log: attention per layer and the RoPE variant."""
        a = self.args
        return (f"{type(self).__name__}: {a.num_layers} layers, {attention_runs(a.windows, 'causal')}; "
                f"{a.num_heads} query / "
                f"{a.num_kv_heads} key-value heads of {a.head_dim}; {a.rope.describe()}")

    def weight_map(self) -> dict[str, tuple[str, ...]]:
        a = self.args
        m = {"embed.weight": ("embed_tokens.weight",), "norm": ("norm.weight",)}
        for i in range(a.num_layers):
            src, dst = f"layers.{i}.", f"layers.{i}."
            m[dst + "attn_norm"] = (src + "input_layernorm.weight",)
            m[dst + "mlp_norm"] = (src + "post_attention_layernorm.weight",)
            m[dst + "qkv.weight"] = tuple(src + f"self_attn.{p}_proj.weight" for p in "qkv")
            if a.qkv_bias:
                m[dst + "qkv.bias"] = tuple(src + f"self_attn.{p}_proj.bias" for p in "qkv")
            m[dst + "o.weight"] = (src + "self_attn.o_proj.weight",)
            if a.o_bias:
                m[dst + "o.bias"] = (src + "self_attn.o_proj.bias",)
            if a.qk_norm:
                m[dst + "q_norm"] = (src + "self_attn.q_norm.weight",)
                m[dst + "k_norm"] = (src + "self_attn.k_norm.weight",)
            m[dst + "gate_up.weight"] = (src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight")
            m[dst + "down.weight"] = (src + "mlp.down_proj.weight",)
            if a.mlp_bias:
                m[dst + "gate_up.bias"] = (src + "mlp.gate_proj.bias", src + "mlp.up_proj.bias")
                m[dst + "down.bias"] = (src + "mlp.down_proj.bias",)
        return m

    def new_cache(self, length: int, device: torch.device) -> KVCache:
        a = self.args
        shape = (a.num_layers, length, a.num_kv_heads, a.head_dim)
        dtype = self.embed.weight.dtype
        return KVCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        caches: list[KVCache | None] | None = None,
        *,
        lengths: list[int] | None = None,
        cu_seqlens_k: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids [T]``, ``positions [T]`` (within each whole input) -> hidden ``[T, H]``.

        ``caches``: per sequence, the key cache of a long input whose chunk this is (its earlier chunks'
        keys are attended to, this chunk's are appended), or None for a whole input. ``lengths``: the host
        copy of the sequence lengths; ``cu_seqlens_k``: the key offsets on the device when there are caches
        (each sequence's keys are its cache's filled part plus its own tokens). Given both, nothing here
        waits on the device."""
        a = self.args
        prefixes, max_k, k_lengths = None, None, None
        if caches is not None and any(c is not None for c in caches):
            if lengths is None:
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            prefixes = _Prefixes(caches, lengths)
            k_lengths = [n + (c.filled if c is not None else 0) for n, c in zip(lengths, caches)]
            if cu_seqlens_k is None:
                cu_seqlens_k = torch.tensor([0] + k_lengths, device=cu_seqlens.device).cumsum(0).to(torch.int32)
            max_k = max(k_lengths)
        else:
            cu_seqlens_k = None
        batches = {
            w: self.kernels.attention_batch(cu_seqlens, max_seqlen, causal=True, window=w, cu_seqlens_k=cu_seqlens_k,
                                            max_seqlen_k=max_k, lengths=lengths, k_lengths=k_lengths)
            for w in set(a.windows)
        }
        inv_freq = a.rope.inv_freq_on(a.head_dim, input_ids.device)
        cos, sin = cos_sin(positions, inv_freq, self.embed.weight.dtype)  # [T, 1, d]
        h = self.embed(input_ids)  # [T, H]
        for i, (layer, window) in enumerate(zip(self.layers, a.windows)):
            h = layer(h, batches[window], cos, sin, self.kernels.linear, prefixes, i)
        if prefixes is not None:
            for n, c in zip(prefixes.lengths, caches):
                if c is not None:
                    c.filled += n
        return rms_norm(h, self.norm, a.rms_norm_eps)
