"""--quantize int8 on the CPU: accuracy against float32 references, measured, not assumed (>= 0.99 cosine; MiniLM
with 8-bit weights >= 0.995, issue 32's bar).

Both weight widths are checked on any host: 8-bit weights where the CPU's int8 GEMM sums full products exactly
(VNNI), and the 7-bit weights that CPUs without VNNI get, forced here (their narrowing layers then keep 8-bit
weights with unsigned 7-bit activations on oneDNN's GEMM, or stay float on ``_int_mm``).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
import torch.nn.functional as F

import embedserve.engine.loading as loading
from embedserve.config import EngineConfig, ModelConfig
from embedserve.engine.cpu import CpuInfo, read_cpu
from embedserve.engine.front import Engine
from embedserve.errors import ConfigError
from embedserve.kernels.linear import Int8Linear, int8_fusion_problem, int8_gemm, int8_weight_max
from test_minilm_parity import varied_texts
from tiny import build_tiny_decoder, hf_embed_each, mixed_texts

COS_MIN = 0.99


@pytest.fixture(params=[127, 63], ids=["8-bit-weights", "7-bit-weights"])
def weight_max(request, monkeypatch):
    if request.param == 127 and int8_weight_max() != 127:
        pytest.skip("this CPU's int8 GEMM saturates full 8-bit products (no VNNI)")
    monkeypatch.setattr(loading, "int8_weight_max", lambda: request.param)
    return request.param


def embed_int8(path, texts):
    engine = Engine(EngineConfig(model=ModelConfig(path=str(path), device="cpu", quantize="int8")))
    engine.start()
    try:
        return engine, asyncio.run(engine.embed(texts)).vectors
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = varied_texts()
    return texts, SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, convert_to_tensor=True)


def test_minilm_int8_within_0995_of_sentence_transformers(minilm_dir, minilm_reference, weight_max, caplog):
    caplog.set_level(logging.INFO, logger="embedserve")
    texts, ref = minilm_reference
    engine, got = embed_int8(minilm_dir, texts)
    cos = F.cosine_similarity(got, ref.float())
    bar = 0.995 if weight_max == 127 else COS_MIN
    assert cos.min() >= bar, (weight_max, float(cos.min()), texts[int(cos.argmin())][:40])
    assert cos.mean() >= 0.995, float(cos.mean())
    layers = [m for m in engine.model.encoder.modules() if isinstance(m, Int8Linear)]
    # 6 layers x (qkv, out, up, down); 7-bit weights: the down projections take 7-bit unsigned activations
    # (oneDNN's GEMM) or stay float (_int_mm)
    assert len(layers) == (18 if weight_max == 63 and int8_gemm() == "int_mm" else 24)
    assert all(m.smooth is not None for m in layers)  # every one calibrated
    unsigned = [m for m in layers if m.unsigned]
    if int8_gemm() == "onednn":
        # the narrowing layers (the down projections) take unsigned activations: 8-bit with 8-bit weights
        # elsewhere, 7-bit (with 8-bit weights) where the others have 7-bit weights
        assert len(unsigned) == 6 and all(m.in_features > m.out_features for m in unsigned)
        assert {m.steps for m in unsigned} == {254.0 if weight_max == 127 else 127.0}
        widths = ("8-bit weights; 6 narrowing layers 8-bit unsigned activations" if weight_max == 127 else
                  "7-bit weights; 6 narrowing layers 8-bit weights, 7-bit unsigned activations")
    else:
        assert not unsigned
        widths = "8-bit weights" if weight_max == 127 else "7-bit weights"
    fused = int8_fusion_problem() is None  # each GEMM's input levels: one compiled pass where inductor builds it
    assert all(m.fused == fused for m in layers)
    passes = "fused levels" if fused else "eager levels"
    assert f"int8: {len(layers)} linear layers quantized ({widths}, {int8_gemm()} GEMM, {passes}) after" in caplog.text
    # where the CPU has native bf16, one layer of each shape was timed against bf16 GEMMs and the answer logged
    compared = "as long as bf16 GEMMs of the same layers (384->1152, 384->384, 384->1536, 1536->384; 2048 rows"
    assert (compared in caplog.text) == read_cpu().bf16
    assert engine.dtype == torch.float32


@pytest.mark.parametrize("ratio, level, words", [
    (1.6, "WARNING", "took 1.60x as long as bf16 GEMMs of the same layers (16->48, 48->16; 2048 rows, measured at "
                     "start-up): serving without --quantize, in bfloat16 (--dtype auto here), would likely be faster"),
    (1.1, "INFO", "took 1.10x as long as bf16 GEMMs of the same layers (16->48, 48->16; 2048 rows"),
])
def test_int8_start_up_says_whether_bf16_gemms_of_its_layers_were_faster(monkeypatch, caplog, ratio, level, words):
    """The operator asked for int8 to serve faster: where bf16 GEMMs beat it (a CPU with AMX) start-up warns and
    names the faster way. (The timing itself: test_linear's int8_time_ratio test, on a fake clock.)"""
    layers = [torch.nn.Linear(16, 48), torch.nn.Linear(48, 16), torch.nn.Linear(16, 8)]
    pairs = [(layers[0], Int8Linear(layers[0])), (layers[1], Int8Linear(layers[1])), (layers[2], layers[2])]
    timed = []
    monkeypatch.setattr(loading, "int8_time_ratio", lambda p, dtype: timed.append((p, dtype)) or ratio)
    monkeypatch.setattr(loading.cpu_caps, "read_cpu", lambda: CpuInfo("a CPU", frozenset({"avx512_bf16"})))
    caplog.set_level(logging.INFO, logger="embedserve")
    loading._compare_with_bf16(pairs)
    assert timed == [(pairs[:2], torch.bfloat16)]  # the int8 ones (a layer left float is not timed)
    said = [r for r in caplog.records if "as long as bf16 GEMMs" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == level and words in said[0].getMessage()


def test_without_native_bf16_int8_start_up_times_nothing_against_it(monkeypatch, caplog):
    layer = torch.nn.Linear(16, 48)
    monkeypatch.setattr(loading, "int8_time_ratio", lambda p, dtype: pytest.fail("timed on a CPU without bf16"))
    monkeypatch.setattr(loading.cpu_caps, "read_cpu", lambda: CpuInfo("a CPU", frozenset({"avx2", "avx512_vnni"})))
    caplog.set_level(logging.INFO, logger="embedserve")
    loading._compare_with_bf16([(layer, Int8Linear(layer))])
    assert "bf16 GEMMs" not in caplog.text


def test_tiny_decoder_int8_within_099_of_transformers(tmp_path, weight_max):
    model = build_tiny_decoder(tmp_path, "qwen3", pooling="last")
    texts = mixed_texts(24, seed=5) + ["a"]
    _, got = embed_int8(tmp_path, texts)
    ref = hf_embed_each(model, tmp_path, texts, pooling="last")
    cos = F.cosine_similarity(got, ref)
    assert cos.min() >= COS_MIN, (weight_max, float(cos.min()))


def test_a_text_gets_the_same_int8_vector_alone_or_packed(minilm_dir):
    """Per-token scales: a text's int8 inputs do not depend on its step's other texts. (Float noise from the
    float parts, attention run alone or bucketed, can still flip a rounding: close, not bit-identical.)"""
    texts = mixed_texts(40, seed=8)
    engine = Engine(EngineConfig(model=ModelConfig(path=str(minilm_dir), device="cpu", quantize="int8")))
    engine.start()
    try:
        batch = asyncio.run(engine.embed(texts)).vectors
        for i in (0, 17, 39):
            alone = asyncio.run(engine.embed([texts[i]])).vectors[0]
            assert F.cosine_similarity(alone, batch[i], dim=0) >= 0.999, i  # measured: 0.9996 at worst
    finally:
        engine.shutdown()


def test_int8_is_refused_on_cuda_and_with_a_half_precision(minilm_dir, monkeypatch):
    with pytest.raises(ConfigError, match="dtype float16 cannot go with it"):
        ModelConfig(path=str(minilm_dir), dtype="float16", quantize="int8")
    monkeypatch.setattr(loading, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(loading, "bind_thread", lambda device: None)
    with pytest.raises(ConfigError, match="--quantize int8 runs on the CPU only"):
        Engine(EngineConfig(model=ModelConfig(path=str(minilm_dir), quantize="int8")))
