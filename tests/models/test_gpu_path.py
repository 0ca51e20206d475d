"""What only a GPU can show: a step is staged and launched without the host waiting on the device, results come
back through pinned memory, and a GPU other than cuda:0 works. Skipped unless EMBEDSERVE_TEST_DEVICE=cuda."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from embedserve.config import EngineConfig, SchedulerConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.engine.runner import Chunk
from on_device import cos_min, model_config, needs_cuda
from tiny import build_tiny_decoder, build_tiny_encoder, long_text, mixed_texts

pytestmark = needs_cuda


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-bert")
    build_tiny_encoder(path, "bert", seed=4, hidden_size=64, num_attention_heads=4)  # head dim 16
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu-qwen3")
    build_tiny_decoder(path, "qwen3", pooling="mean", seed=4, max_position_embeddings=4096)  # head dim 12: padded
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 4096}))
    return path


def ids_for(engine: Engine, texts: list[str]) -> list[list[int]]:
    return engine.tokenizer.encode(texts, truncate=True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_step_is_launched_without_waiting_on_the_device(bert_dir, dtype):
    engine = Engine(EngineConfig(model=model_config(bert_dir, dtype=dtype)))
    engine.warmup()  # Triton compiles here, not inside the checked launch
    inputs = ids_for(engine, mixed_texts(40, seed=2))
    B = len(inputs)
    args = (inputs, [engine.dimensions] * B, [True] * B, [i % 2 == 0 for i in range(B)])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in staging, attention bookkeeping, pooling: raises
    try:
        handle = engine.runner.launch(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert handle.event is not None and handle.vectors.is_pinned() and handle.encoded.is_pinned()
    out = engine.runner.collect(handle)
    ref = engine.runner.run(*args)  # the same step again, waited for
    torch.testing.assert_close(out.vectors, ref.vectors)
    assert out.encoded == ref.encoded and len(out.encoded) > 0


def test_chunks_over_their_key_cache_launch_without_waiting(qwen_dir):
    engine = Engine(EngineConfig(model=model_config(qwen_dir, dtype="bfloat16"),
                                 scheduler=SchedulerConfig(max_batch_tokens=2048, chunk_tokens=256)))
    engine.warmup()
    long_ids = ids_for(engine, [long_text(1000, seed=2)])[0]
    short = ids_for(engine, mixed_texts(6, seed=3))
    key, total = ("long",), len(long_ids)
    for start in range(0, total, 256):
        n = min(256, total - start)
        inputs = [long_ids[start : start + n]] + short
        chunks = [Chunk(key, start, total, start + n == total)] + [None] * len(short)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            handle = engine.runner.launch(inputs, [engine.dimensions] * len(inputs), [True] * len(inputs),
                                          [False] * len(inputs), chunks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        engine.runner.collect(handle)
    assert engine.runner.kv_inputs == 0  # the final chunk freed its cache


def test_two_steps_in_flight_on_the_gpu_match_one_at_a_time(bert_dir):
    texts = [f"pipelined text {i} " * (1 + i % 9) for i in range(200)]
    vectors = {}
    for depth in (1, 2):
        e = Engine(EngineConfig(model=model_config(bert_dir, dtype="bfloat16"),
                                scheduler=SchedulerConfig(max_batch_tokens=1024, max_batch_requests=16)),
                   pipeline_depth=depth)
        e.start()

        async def go(e=e):
            return await asyncio.gather(*(e.embed([t], EmbedOptions(encodings=("base64",))) for t in texts))

        try:
            vectors[depth] = torch.cat([r.vectors for r in asyncio.run(go())])
        finally:
            e.shutdown()
    # Steps are packed differently with two in flight; bf16 GEMMs of other sizes round differently.
    assert torch.nn.functional.cosine_similarity(vectors[2], vectors[1]).min() >= cos_min("bfloat16")


def test_a_gpu_other_than_the_first(bert_dir):
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU: cuda:N for N > 0 needs two")
    last = f"cuda:{torch.cuda.device_count() - 1}"
    from embedserve.config import ModelConfig

    e = Engine(EngineConfig(model=ModelConfig(path=str(bert_dir), device=last, pool_kernel="triton")))
    e.warmup()
    e.start()
    try:
        got = asyncio.run(e.embed(["on another GPU"], EmbedOptions(encodings=("base64",))))
    finally:
        e.shutdown()
    ref = Engine(EngineConfig(model=model_config(bert_dir, dtype="bfloat16")))
    want = ref.runner.run(ids_for(ref, ["on another GPU"]), [ref.dimensions], [False], [False]).vectors
    assert torch.nn.functional.cosine_similarity(got.vectors, want).min() > 0.999

