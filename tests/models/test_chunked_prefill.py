"""Chunked prefill: a long input run chunk by chunk over a key cache gives the vector of one whole pass."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
import torch.nn.functional as F

from embedserve.config import EngineConfig, SchedulerConfig
from embedserve.engine.front import Engine
from on_device import ON_CUDA, cos_min, model_config
from polling import until_async
from tiny import build_tiny_decoder, hf_embed_each, long_text, mixed_texts

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE

LONG = 5200  # tokens


@pytest.fixture(scope="module", params=[("qwen3", "last"), ("qwen3", "mean"), ("llama", "mean"), ("llama", "last")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def built(request, tmp_path_factory):
    kind, pooling = request.param
    path = tmp_path_factory.mktemp(f"{kind}-{pooling}")
    model = build_tiny_decoder(path, kind, pooling=pooling, seed=5, max_position_embeddings=8192)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192}))
    return path, model, pooling


@pytest.fixture(scope="module")
def folder(built):
    return built[0]


def engine_for(path, chunk: int | None, batch_tokens: int = 8192, dtype: str = "float32") -> Engine:
    scheduler = SchedulerConfig(max_batch_tokens=batch_tokens, chunk_tokens=chunk if chunk else 0)
    e = Engine(EngineConfig(model=model_config(path, dtype=dtype), scheduler=scheduler))
    e.start()
    return e


def hold_chunks_until_waiting(engine: Engine, inputs: int, forward=None) -> list[bool]:
    """The engine thread's first step that carries a chunk waits (polling, 60 s at most) until the long input and
    ``inputs`` short ones have all reached the scheduler (waiting, or in this very step when they arrived before
    it was formed): short inputs then surely share chunk steps, whatever the thread timing. Returns a list that
    gets True once the wait ended with them there (False: the 60 s ran out)."""
    encoder = engine.model.encoder
    inner = forward or encoder.forward
    held = []

    def gated(*args, **kw):
        caches = args[4] if len(args) > 4 else kw.get("caches")
        if not held and caches and any(c is not None for c in caches):
            deadline = time.monotonic() + 60
            stats = engine.scheduler.stats
            while stats.waiting_inputs + stats.running_inputs < inputs + 1 and time.monotonic() < deadline:
                time.sleep(0.002)
            held.append(stats.waiting_inputs + stats.running_inputs >= inputs + 1)
        return inner(*args, **kw)

    encoder.forward = gated
    return held


def run(engine: Engine, groups):
    async def go():
        return await asyncio.gather(*(engine.embed(g) for g in groups))

    try:
        return asyncio.run(go())
    finally:
        engine.shutdown()


# On CUDA also in bf16, where chunks attend to their cached keys through the flash kernel.
@pytest.mark.parametrize("dtype", ["float32"] + (["bfloat16"] if ON_CUDA else []))
def test_chunk_sizes_give_the_unchunked_vector_alone_and_among_short_inputs(built, dtype):
    text = long_text(LONG, seed=1)
    short = mixed_texts(12, seed=9)
    folder, model, pooling = built
    (whole,) = run(engine_for(folder, None, dtype=dtype), [[text]])
    assert whole.token_counts[0] > 5000
    # The whole pass against transformers' own forward over all 5,200 positions (RoPE far past the 300 or so
    # the other decoder tests reach).
    want = hf_embed_each(model, folder, [text], pooling=pooling, max_length=8192)
    assert F.cosine_similarity(whole.vectors, want).min() >= cos_min(dtype)
    for chunk in (64, 100, 257):
        alone, *others = run(engine_for(folder, chunk, batch_tokens=2 * chunk + 600, dtype=dtype),
                             [[text]] + [[t] for t in short])
        assert F.cosine_similarity(alone.vectors, whole.vectors).min() >= cos_min(dtype), chunk
        # The short inputs shared steps with the chunks and still get their own vectors.
        (ref,) = run(engine_for(folder, None, dtype=dtype), [short])
        got = torch.cat([r.vectors for r in others])
        assert F.cosine_similarity(got, ref.vectors).min() >= cos_min(dtype), chunk


def test_chunks_interleave_with_short_requests(folder):
    engine = engine_for(folder, 100, batch_tokens=400)
    steps = []
    real = engine.runner.launch

    def spy(inputs, dims, normalize, want=None, chunks=None, *rest):
        steps.append((len(inputs), sum(c is not None for c in chunks or [])))
        return real(inputs, dims, normalize, want, chunks, *rest)

    engine.runner.launch = spy
    shorts = mixed_texts(30, seed=1)
    held = hold_chunks_until_waiting(engine, len(shorts))

    async def go():
        long = asyncio.create_task(engine.embed([long_text(2000, seed=3)]))
        await until_async(lambda: sum(engine.queue_stats()[:3:2]) > 0, "the long input queued")  # it goes first
        short = asyncio.gather(*(engine.embed([t]) for t in shorts))
        return [await long, *await short]

    try:
        results = asyncio.run(go())
    finally:
        engine.shutdown()
    assert len(results) == 31 and held == [True]
    mixed = [s for s in steps if s[1] and s[0] > s[1]]
    assert mixed, steps  # some steps carried a chunk and short inputs together
    assert engine.runner.kv_inputs == 0  # the cache was freed with the last chunk


def test_cancelling_a_long_input_frees_its_cache(folder):
    engine = engine_for(folder, 64, batch_tokens=256)

    async def go():
        task = asyncio.create_task(engine.embed([long_text(LONG, seed=2)]))
        await until_async(lambda: engine.runner.kv_inputs > 0, "a chunk's keys cached")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_async(lambda: engine.runner.kv_inputs == 0 and engine.scheduler.stats.kv_tokens == 0,
                    "the cancelled input's cache freed")

    try:
        asyncio.run(go())
        assert engine.scheduler.stats.dropped_inputs == 1
    finally:
        engine.shutdown()


def test_out_of_memory_after_a_chunk_ran_retries_it_from_where_it_was(folder):
    """Steps holding a chunk and short inputs run out of memory after the forward pass wrote the chunk's keys and
    moved its cache on (as when pooling's allocation fails): the split retries the chunk from its saved state,
    and the long input still gets the vector of one whole pass, the short ones theirs."""
    text = long_text(1500, seed=4)
    shorts = mixed_texts(8, seed=2)
    (whole,) = run(engine_for(folder, None), [[text]])
    (alone,) = run(engine_for(folder, None), [shorts])
    engine = engine_for(folder, 128, batch_tokens=512)
    encoder = engine.model.encoder
    real = encoder.forward
    failed = []

    def forward(*args, **kw):
        out = real(*args, **kw)
        caches = args[4] if len(args) > 4 else kw.get("caches")
        if caches and len(caches) > 1 and any(c is not None for c in caches) and len(failed) < 3:
            failed.append(len(caches))
            raise torch.OutOfMemoryError("CUDA out of memory (test: after the chunk's keys were written)")
        return out

    held = hold_chunks_until_waiting(engine, len(shorts), forward)

    async def go():
        long = asyncio.create_task(engine.embed([text]))
        # The long input is queued first; its first chunk's step waits until the short ones wait too, so they
        # join its later chunks.
        await until_async(lambda: sum(engine.queue_stats()[:3:2]) > 0, "the long input queued")
        short = [asyncio.create_task(engine.embed([t])) for t in shorts]
        return await long, await asyncio.gather(*short)

    try:
        long, short = asyncio.run(go())
    finally:
        engine.shutdown()
    assert held == [True] and failed  # steps holding a chunk beside short inputs failed after writing its keys
    assert F.cosine_similarity(long.vectors, whole.vectors).min() >= cos_min("float32")
    got = torch.cat([r.vectors for r in short])
    assert F.cosine_similarity(got, alone.vectors).min() >= cos_min("float32")
    assert engine.runner.kv_inputs == 0
