"""Loading a model directory: strict names and shapes, helpful errors, sharded checkpoints, dtypes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from on_device import model_config
from tiny import build_tiny_encoder
from embedserve.errors import ModelLoadError
from embedserve.models.sentence import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    build_tiny_encoder(path, "bert")
    return path


@pytest.fixture
def copy(tiny_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_loads_in_each_dtype(tiny_dir):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m = load_model(tiny_dir, dtype=dtype, device=CPU)
        assert {p.dtype for p in m.encoder.parameters()} == {dtype}
        assert m.spec.pooling == "mean" and m.dimensions == 36 and m.max_length == 512


def test_missing_tensor_is_named(copy):
    rewrite_weights(copy, lambda t: t.pop("encoder.layer.1.attention.self.key.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\): encoder\.layer\.1\.attention\.self\.key\.weight"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_unexpected_tensor_is_named(copy):
    rewrite_weights(copy, lambda t: t.update({"encoder.layer.0.surprise": torch.zeros(3)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor\(s\): encoder\.layer\.0\.surprise"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_misshaped_tensor_is_named_with_both_shapes(copy):
    rewrite_weights(copy, lambda t: t.update({"encoder.layer.0.output.dense.weight": torch.zeros(36, 49)}))
    with pytest.raises(ModelLoadError, match=r"encoder\.layer\.0\.output\.dense\.weight.*\(36, 49\).*\(36, 50\)"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_known_unused_tensors_are_ignored_and_prefixes_stripped(copy):
    def edit(t):
        for k in list(t):
            t["bert." + k] = t.pop(k)
        t["cls.predictions.bias"] = torch.zeros(30522)

    rewrite_weights(copy, edit)
    m = load_model(copy, dtype=torch.float32, device=CPU)
    assert m.encoder.layers[0].qkv.weight.shape == (108, 36)


def test_sharded_checkpoint_loads_the_same_weights(tiny_dir, tmp_path):
    import transformers

    model = transformers.BertModel.from_pretrained(str(tiny_dir))
    model.save_pretrained(tmp_path, max_shard_size="500KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    for f in ("tokenizer.json", "modules.json"):
        shutil.copy(tiny_dir / f, tmp_path / f)
    shutil.copytree(tiny_dir / "1_Pooling", tmp_path / "1_Pooling")
    a = load_model(tiny_dir, dtype=torch.float32, device=CPU).encoder.state_dict()
    b = load_model(tmp_path, dtype=torch.float32, device=CPU).encoder.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _pool_at(copy, path: str) -> None:
    modules = json.loads((copy / "modules.json").read_text())
    next(m for m in modules if m["type"].endswith("Pooling"))["path"] = path
    (copy / "modules.json").write_text(json.dumps(modules))


@pytest.mark.parametrize("where", ["../outside", "/etc", "sub/../../outside", "link-out"])
def test_a_module_path_that_leads_out_of_the_folder_stops_the_load_naming_it(copy, tmp_path, where):
    outside = tmp_path / "outside"
    shutil.copytree(copy / "1_Pooling", outside)  # a valid module there: only where it is is wrong
    (copy / "link-out").symlink_to(outside, target_is_directory=True)
    _pool_at(copy, where)
    with pytest.raises(ModelLoadError, match=rf"modules.json names '{where}'.*(not a path inside|leads out of)"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_a_module_path_inside_the_folder_loads_even_through_a_symlink_inside(copy):
    (copy / "pool-link").symlink_to(copy / "1_Pooling", target_is_directory=True)
    _pool_at(copy, "pool-link")
    assert load_model(copy, dtype=torch.float32, device=CPU).spec.pooling == "mean"


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/tmp/elsewhere.safetensors"])
def test_a_shard_name_that_leads_out_of_the_folder_stops_the_load_naming_it(tiny_dir, tmp_path, shard):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "modules.json"):
        shutil.copy(tiny_dir / f, folder / f)
    shutil.copytree(tiny_dir / "1_Pooling", folder / "1_Pooling")
    shutil.copy(tiny_dir / "model.safetensors", tmp_path / "elsewhere.safetensors")
    names = load_file(tiny_dir / "model.safetensors").keys()
    index = {"metadata": {}, "weight_map": {n: shard for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"model.safetensors.index.json names '{shard}'"):
        load_model(folder, dtype=torch.float32, device=CPU)


def test_pickled_weights_are_refused_by_name(copy):
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin: pickled weights are never loaded"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_missing_config_is_named(copy):
    (copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing file .*config\.json"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", dtype=torch.float32, device=CPU)


def test_unsupported_architecture_lists_the_supported_ones(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(architectures=["GPTNeoXModel"], model_type="gpt_neox")
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unsupported model.*Supported architectures: .*BertModel.*XLMRobertaModel"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_remote_code_of_an_architecture_not_implemented_is_refused_naming_it_and_the_mappings(copy):
    """jina-embeddings-v2 says model_type "bert" but runs ALiBi in its remote code: never served as BERT."""
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(architectures=["JinaBertForMaskedLM"],
               auto_map={"AutoConfig": "jinaai/jina-bert-implementation--configuration_bert.JinaBertConfig",
                         "AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel"})
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_model(copy, dtype=torch.float32, device=CPU)
    message = str(e.value)
    assert "JinaBertForMaskedLM" in message and "never runs remote code" in message
    assert "NewModel -> GteModel" in message and "NomicBertModel -> NomicBertModel" in message


def test_an_auto_map_for_the_tokenizer_alone_does_not_count_as_remote_code(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["some/repo--tokenization.Tok", None]}
    (copy / "config.json").write_text(json.dumps(cfg))
    assert load_model(copy, dtype=torch.float32, device=CPU).encoder.__class__.__name__ == "BertModel"


def test_unsupported_pooling_is_named(copy):
    cfg = json.loads((copy / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"pooling_mode_max_tokens.*not supported"):
        load_model(copy, dtype=torch.float32, device=CPU)


def test_dense_head_and_sentence_configs_are_read(copy):
    modules = json.loads((copy / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    modules.append({"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"})
    (copy / "modules.json").write_text(json.dumps(modules))
    (copy / "2_Dense").mkdir()
    (copy / "2_Dense" / "config.json").write_text(
        json.dumps({"in_features": 36, "out_features": 20, "bias": True,
                    "activation_function": "torch.nn.modules.activation.Tanh"})
    )
    save_file({"linear.weight": torch.randn(20, 36), "linear.bias": torch.randn(20)}, copy / "2_Dense" / "model.safetensors")
    (copy / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (copy / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: "}, "default_prompt_name": None})
    )
    m = load_model(copy, dtype=torch.float32, device=CPU)
    assert m.dimensions == 20 and m.spec.normalize and m.max_length == 128
    assert m.spec.prompts == {"query": "query: "}

    # And the served vector is sentence-transformers' vector: pooling -> Dense(tanh) -> Normalize.
    import asyncio

    from sentence_transformers import SentenceTransformer

    from embedserve.config import EngineConfig
    from embedserve.engine.front import Engine

    texts = ["a dense head", "word " * 300, ""]
    ref = SentenceTransformer(str(copy), device="cpu").encode(texts, convert_to_tensor=True)
    from embedserve.engine.interface import EmbedOptions

    for kernel in ("torch", "triton"):  # the fused kernel splits around the Dense layer
        engine = Engine(EngineConfig(model=model_config(copy, pool_kernel=kernel)))
        engine.start()
        try:
            result = asyncio.run(engine.embed(texts, EmbedOptions(encodings=("base64",))))
        finally:
            engine.shutdown()
        assert torch.nn.functional.cosine_similarity(result.vectors, ref).min() >= 0.99999, kernel
        import base64

        import numpy as np

        for row, text in zip(result.vectors, result.base64):
            assert text == base64.b64encode(np.asarray(row, "<f4").tobytes())


def test_peak_host_memory_while_loading_stays_within_1_2x_the_checkpoint(tmp_path):
    """A ~310 MB random Qwen3-shaped checkpoint, loaded in a fresh process: weights are read straight into
    their final tensors, so the process grows by about the file's size, not twice it.
"""
    import subprocess
    import sys

    H, I, L, V, heads, kv, d = 1024, 2816, 4, 30522, 16, 8, 64
    cfg = {"architectures": ["Qwen3Model"], "model_type": "qwen3", "vocab_size": V, "hidden_size": H,
           "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv,
           "head_dim": d, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {"embed_tokens.weight": torch.randn(V, H, generator=g), "norm.weight": torch.ones(H)}
    for i in range(L):
        p = f"layers.{i}."
        shapes = {"self_attn.q_proj.weight": (heads * d, H), "self_attn.k_proj.weight": (kv * d, H),
                  "self_attn.v_proj.weight": (kv * d, H), "self_attn.o_proj.weight": (H, heads * d),
                  "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
                  "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H), "mlp.down_proj.weight": (H, I),
                  "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}
        tensors.update({p + k: torch.randn(*s, generator=g) for k, s in shapes.items()})
    save_file(tensors, tmp_path / "model.safetensors")
    del tensors
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 250e6 < size < 400e6

    # Peak resident memory (VmHWM) is reset just before loading, so imports do not count.
    probe = f"""
import torch
from embedserve.models.sentence import load_model
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
model = load_model({str(tmp_path)!r}, dtype=torch.float32, device=torch.device("cpu"))
print(status("VmHWM") - before)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    grown = int(out.stdout.split()[-1])
    assert grown <= 1.2 * size, f"loading grew the process by {grown / size:.2f}x the {size / 1e6:.0f} MB checkpoint"
