"""NomicBERT (nomic-embed-text-v1 / v1.5, snowflake-arctic-embed-m-long) over packed tokens.

The block is GTE's (``gte.GteLayer``: post-norm, RoPE, gated MLP ``act(gate) * up``) without any bias, with
word + token type embeddings -> LayerNorm. What differs is the config's spelling, the RoPE base (transformers'
default is 1000) and the weight names.

Two spellings load: transformers' native ``NomicBertModel`` (``hidden_size``, ``rope_parameters``,
``layers.N.self_attn.q_proj`` ...) and the remote-code original the published checkpoints were saved from
(``n_embd``, ``n_layer``, ``rotary_emb_base``, ``encoder.layers.N.attn.Wqkv``, ``mlp.fc11`` = up, ``mlp.fc12`` =
gate, ``norm1`` / ``norm2``, ``emb_ln``). Options of the original that no published embedder uses (pre-norm,
biases, partial or interleaved rotary, dynamic NTK scaling) are refused by name. The remote code never runs.
"""

from __future__ import annotations

from embedserve.errors import ModelLoadError
from embedserve.models.gte import GteArgs, GteModel
from embedserve.models.rope import RopeSpec

# activation_function of the original -> the gate's activation
_GLU = {"swiglu": "silu", "geglu": "gelu"}


def _pick(cfg: dict, remote: str, native: str, default=None):
    value = cfg.get(remote)
    if value is None:
        value = cfg.get(native, default)
    if value is None:
        raise ModelLoadError(f"NomicBERT config has neither {remote!r} nor {native!r}")
    return value


def nomic_args(cfg: dict) -> GteArgs:
    """GteArgs for a NomicBERT config in either spelling."""
    refused = {
        "prenorm": False, "causal": False, "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
        "rotary_emb_interleaved": False, "rotary_emb_fraction": 1.0, "rotary_scaling_factor": None,
    }
    for key, only in refused.items():
        if key in cfg and cfg[key] != only and not (only is None and cfg[key] in (None, 1, 1.0)):
            raise ModelLoadError(f"NomicBERT with {key}={cfg[key]!r} is not supported (only {only!r})")
    hidden = _pick(cfg, "n_embd", "hidden_size")
    heads = _pick(cfg, "n_head", "num_attention_heads")
    if hidden % heads or cfg.get("head_dim") not in (None, hidden // heads):
        raise ModelLoadError(f"NomicBERT: hidden size {hidden} with {heads} heads and head_dim {cfg.get('head_dim')}"
                             " is not supported (head_dim must be hidden_size / heads)")
    if "activation_function" in cfg:
        if cfg["activation_function"] not in _GLU:
            raise ModelLoadError(f"NomicBERT activation_function {cfg['activation_function']!r} is not supported; "
                                 f"supported: {', '.join(_GLU)}")
        act = _GLU[cfg["activation_function"]]
    else:
        act = cfg.get("hidden_act", "silu")
    if "rotary_emb_base" in cfg:
        rope = RopeSpec(theta=float(cfg["rotary_emb_base"]))
    else:
        rope = RopeSpec.from_hf_config(cfg if "rope_parameters" in cfg or "rope_theta" in cfg
                                       else {**cfg, "rope_theta": 1000.0})
    return GteArgs(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=_pick(cfg, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        intermediate_size=_pick(cfg, "n_inner", "intermediate_size", 4 * hidden),
        max_position_embeddings=_pick(cfg, "n_positions", "max_position_embeddings", 2048),
        type_vocab_size=cfg.get("type_vocab_size", 2) or 0,
        layer_norm_eps=_pick(cfg, "layer_norm_epsilon", "layer_norm_eps", 1e-12),
        hidden_act=act,
        rope=rope,
        attention_bias=False,
        down_bias=False,
    )


class NomicBertModel(GteModel):
    weight_prefixes = ("", "nomic_bert.", "bert.", "model.")
    ignored_weights = (
        r"pooler\..*",
        r"cls\..*",
        r"lm_head\..*",
        r"classifier\..*",
        r"embeddings\.position_ids",
        r".*rotary_emb\..*",
    )

    def weight_maps(self) -> list[dict[str, tuple[str, ...]]]:
        return [self._names(native=True), self._nomic_names()]

    def _nomic_names(self) -> dict[str, tuple[str, ...]]:
        m = self._embedding_names()
        m["embed_norm.weight"], m["embed_norm.bias"] = ("emb_ln.weight",), ("emb_ln.bias",)
        for i in range(self.args.num_layers):
            src, dst = f"encoder.layers.{i}.", f"layers.{i}."
            m[dst + "qkv.weight"] = (src + "attn.Wqkv.weight",)
            m[dst + "o.weight"] = (src + "attn.out_proj.weight",)
            m[dst + "up_gate.weight"] = (src + "mlp.fc11.weight", src + "mlp.fc12.weight")
            m[dst + "down.weight"] = (src + "mlp.fc2.weight",)
            for ours, theirs in (("attn_norm", "norm1"), ("mlp_norm", "norm2")):
                m[f"{dst}{ours}.weight"] = (f"{src}{theirs}.weight",)
                m[f"{dst}{ours}.bias"] = (f"{src}{theirs}.bias",)
        return m
