"""NomicBERT and GTE as the Hub publishes them (remote-code configs and weight names), NTK-scaled RoPE, nomic's
task prompts, and one deliberately broken detail per new family that the parity checks must catch.

The references are transformers' native ports; the remote-spelled checkpoints are written here from a native
model's weights by the renames transformers itself applies when converting (models/*/conversion_mapping).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from on_device import cos_min, model_config
from tiny import TOKENIZER_FILES, build_tiny_encoder, embed_with, hf_embed, mixed_texts, write_sentence_modules

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE

TEXTS = mixed_texts(24, seed=9) + [""]


def _remote_folder(native_dir, dst, config: dict, tensors: dict) -> None:
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(native_dir / name, dst / name)
    write_sentence_modules(dst, pooling="mean", dim=config.get("n_embd") or config["hidden_size"])


def _as_head_checkpoint(tensors: dict, prefix: str, head: dict) -> dict:
    """The encoder's tensors as a *ForPreTraining / *ForMaskedLM checkpoint saves them: under the encoder's
    attribute name, beside the head's own tensors (which an embedding server must leave unused)."""
    return {**{prefix + k: v for k, v in tensors.items()}, **head}


def _layer_tensors(model, i: int) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k.removeprefix(f"layers.{i}."): v for k, v in state.items() if k.startswith(f"layers.{i}.")}


@pytest.mark.parametrize("arch", ["NomicBertModel", "NomicBertForPreTraining"])
def test_nomic_embed_as_published_remote_config_and_names(tmp_path, arch):
    """nomic-embed-text-v1.5's config.json says n_embd / rotary_emb_base and auto_map to nomic-ai/nomic-bert-2048;
    its weights say encoder.layers.N.attn.Wqkv, mlp.fc11 (up) / fc12 (gate), norm1 / norm2, emb_ln.
    NomicBertForPreTraining (nomic-bert-2048 itself) nests them under bert. beside its cls. head."""
    model = build_tiny_encoder(tmp_path / "native", "nomicbert", seed=2)
    c = model.config
    state = model.state_dict()
    tensors = {
        "embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": state["embeddings.token_type_embeddings.weight"],
        "emb_ln.weight": state["embeddings.LayerNorm.weight"],
        "emb_ln.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(c.num_hidden_layers):
        t, dst = _layer_tensors(model, i), f"encoder.layers.{i}."
        tensors[dst + "attn.Wqkv.weight"] = torch.cat([t[f"self_attn.{n}_proj.weight"] for n in "qkv"])
        tensors[dst + "attn.out_proj.weight"] = t["self_attn.o_proj.weight"]
        tensors[dst + "mlp.fc11.weight"] = t["mlp.up_proj.weight"]
        tensors[dst + "mlp.fc12.weight"] = t["mlp.gate_proj.weight"]
        tensors[dst + "mlp.fc2.weight"] = t["mlp.down_proj.weight"]
        for ours, theirs in (("post_attention_layernorm", "norm1"), ("post_mlp_layernorm", "norm2")):
            tensors[f"{dst}{theirs}.weight"] = t[f"{ours}.weight"]
            tensors[f"{dst}{theirs}.bias"] = t[f"{ours}.bias"]
    config = {
        "architectures": [arch], "model_type": "nomic_bert",
        "auto_map": {"AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                     "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel"},
        "n_embd": c.hidden_size, "n_head": c.num_attention_heads, "n_layer": c.num_hidden_layers,
        "n_inner": c.intermediate_size, "n_positions": c.max_position_embeddings,
        "layer_norm_epsilon": c.layer_norm_eps, "activation_function": "swiglu", "vocab_size": c.vocab_size,
        "type_vocab_size": c.type_vocab_size, "rotary_emb_base": c.rope_parameters["rope_theta"],
        "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_scaling_factor": None,
        "prenorm": False, "causal": False, "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
    }
    if arch == "NomicBertForPreTraining":
        tensors = _as_head_checkpoint(tensors, "bert.", {
            "cls.predictions.transform.dense.weight": torch.randn(c.hidden_size, c.hidden_size),
            "cls.predictions.decoder.weight": torch.randn(c.vocab_size, c.hidden_size),
            "cls.predictions.decoder.bias": torch.randn(c.vocab_size)})
    _remote_folder(tmp_path / "native", tmp_path / "remote", config, tensors)
    got = embed_with(tmp_path / "remote", TEXTS)
    ref = hf_embed(model, tmp_path / "native", TEXTS, pooling="mean")
    assert F.cosine_similarity(got, ref).min() >= cos_min("float32")

    config["rotary_emb_fraction"] = 0.5
    (tmp_path / "remote" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="rotary_emb_fraction=0.5 is not supported"):
        embed_with(tmp_path / "remote", ["x"])


def _ntk_inv_freq(theta: float, factor: float, dim: int) -> torch.Tensor:
    """Fixed NTK scaling (kexue.fm/archives/9706; Alibaba-NLP/new-impl's NTKScalingRotaryEmbedding without
    mixed_b, at every length), written per frequency in float64 Python rather than as the code's tensor
    expression: frequency i of dim/2 is theta ** (-2i/dim) * factor ** (-(2i + 2)/dim). Its defining ends are
    checked: the highest frequency barely moves (divided by factor ** (2/dim)), the lowest is divided by the
    factor itself (interpolated, as linear scaling would)."""
    plain = [theta ** (-2 * i / dim) for i in range(dim // 2)]
    scaled = [theta ** (-2 * i / dim) * factor ** (-(2 * i + 2) / dim) for i in range(dim // 2)]
    assert math.isclose(scaled[-1], plain[-1] / factor) and math.isclose(scaled[0], factor ** (-2 / dim))
    return torch.tensor(scaled, dtype=torch.float64).float()


@pytest.mark.parametrize("packed, arch", [(True, "NewModel"), (False, "NewModel"), (True, "NewForMaskedLM")],
                         ids=["pack_qkv", "separate_qkv", "masked_lm"])
def test_gte_v15_as_published_new_model_with_ntk_rope(tmp_path, packed, arch):
    """gte-base-en-v1.5: architectures NewModel, model_type "new", auto_map to Alibaba-NLP/new-impl,
    rope_scaling {"type": "ntk", "factor": 2.0}, weights encoder.layer.N.attention.qkv_proj, mlp.up_gate_proj
    (up first), attn_ln / mlp_ln. NewForMaskedLM nests them under new. beside its lm_head."""
    model = build_tiny_encoder(tmp_path / "native", "gte", seed=3)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    model.rotary_emb.inv_freq.copy_(_ntk_inv_freq(c.rope_parameters["rope_theta"], 2.0, head_dim))
    state = model.state_dict()
    tensors = {k: state[k] for k in ("embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight",
                                     "embeddings.LayerNorm.bias")}
    for i in range(c.num_hidden_layers):
        t, dst = _layer_tensors(model, i), f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            if packed:
                tensors[f"{dst}attention.qkv_proj.{p}"] = torch.cat([t[f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            else:
                for n in "qkv":
                    tensors[f"{dst}attention.{n}_proj.{p}"] = t[f"self_attn.{n}_proj.{p}"]
            tensors[f"{dst}attention.o_proj.{p}"] = t[f"self_attn.o_proj.{p}"]
            tensors[f"{dst}mlp.down_proj.{p}"] = t[f"mlp.down_proj.{p}"]
            tensors[f"{dst}attn_ln.{p}"] = t[f"post_attention_layernorm.{p}"]
            tensors[f"{dst}mlp_ln.{p}"] = t[f"post_mlp_layernorm.{p}"]
        tensors[f"{dst}mlp.up_gate_proj.weight"] = torch.cat([t["mlp.up_proj.weight"], t["mlp.gate_proj.weight"]])
    config = {
        "architectures": [arch], "model_type": "new",
        "auto_map": {"AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig",
                     "AutoModel": "Alibaba-NLP/new-impl--modeling.NewModel"},
        "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
        "hidden_act": c.hidden_act, "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
        "type_vocab_size": 0, "layer_norm_eps": c.layer_norm_eps, "layer_norm_type": "layer_norm",
        "position_embedding_type": "rope", "rope_theta": c.rope_parameters["rope_theta"],
        "rope_scaling": {"type": "ntk", "factor": 2.0}, "pack_qkv": packed, "logn_attention_scale": False,
        "unpad_inputs": False, "use_memory_efficient_attention": False,
    }
    if arch == "NewForMaskedLM":
        tensors = _as_head_checkpoint(tensors, "new.", {
            "lm_head.transform.dense.weight": torch.randn(c.hidden_size, c.hidden_size),
            "lm_head.decoder.weight": torch.randn(c.vocab_size, c.hidden_size),
            "lm_head.decoder.bias": torch.randn(c.vocab_size)})
    _remote_folder(tmp_path / "native", tmp_path / "remote", config, tensors)
    got = embed_with(tmp_path / "remote", TEXTS)
    ref = hf_embed(model, tmp_path / "native", TEXTS, pooling="mean")
    assert F.cosine_similarity(got, ref).min() >= cos_min("float32")


NOMIC_PROMPTS = {"search_query": "search_query: ", "search_document": "search_document: ",
                 "classification": "classification: ", "clustering": "clustering: "}


def test_nomic_task_prefixes_as_prompts_match_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    build_tiny_encoder(tmp_path, "nomicbert", normalize=True, seed=4)
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": NOMIC_PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    st = SentenceTransformer(str(tmp_path), device="cpu")
    engine = Engine(EngineConfig(model=model_config(tmp_path)))
    engine.start()
    try:
        for prompt in (None, "search_query", "search_document"):
            ref = st.encode(TEXTS, prompt_name=prompt, convert_to_tensor=True)
            got = asyncio.run(engine.embed(TEXTS, EmbedOptions(prompt_name=prompt))).vectors
            assert F.cosine_similarity(got, ref).min() >= cos_min("float32"), prompt
        # The prefix changes the vector: the prompt really reached the model.
        plain = asyncio.run(engine.embed(["what is rope"])).vectors
        query = asyncio.run(engine.embed(["what is rope"], EmbedOptions(prompt_name="search_query"))).vectors
        assert F.cosine_similarity(plain, query).item() < 0.9999
    finally:
        engine.shutdown()


def _scale_rope_base(path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] *= 2
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind", ["mpnet", "nomicbert", "gte", "modernbert"])
def test_one_wrong_detail_per_family_fails_the_parity_check(tmp_path, kind, monkeypatch):
    """The parity threshold is tight enough to see a detail computed wrong: MPNet's buckets with a shorter
    maximum distance, NomicBERT's and GTE's RoPE with twice the base, ModernBERT's local window twice as wide."""
    from embedserve.models import mpnet

    model = build_tiny_encoder(tmp_path, kind, seed=6)
    texts = mixed_texts(30) + [""]
    ref = hf_embed(model, tmp_path, texts, pooling="mean")
    assert F.cosine_similarity(embed_with(tmp_path, texts), ref).min() >= cos_min("float32")
    if kind == "mpnet":
        right = mpnet.relative_buckets
        monkeypatch.setattr(mpnet, "relative_buckets", lambda rel: right(rel, max_distance=64))
    elif kind == "modernbert":
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg["local_attention"] *= 2
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    else:
        _scale_rope_base(tmp_path)
    assert F.cosine_similarity(embed_with(tmp_path, texts), ref).min() < cos_min("float32")
