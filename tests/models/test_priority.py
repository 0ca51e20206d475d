"""Request priority in a running engine (the real all-MiniLM-L6-v2): a priority-0 request queued behind a large
priority-100 one goes into the next step and is answered first; ordering is decided by the queue, not by timing."""

from __future__ import annotations

import asyncio

import pytest

from embedserve.config import EngineConfig, SchedulerConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import InvalidRequest
from on_device import model_config
from polling import until_async
from tiny import MINILM_DIR, mixed_texts

BULK = mixed_texts(192, seed=8)


@pytest.fixture(scope="module")
def engine():
    # 512-token steps: the bulk request needs many of them
    e = Engine(EngineConfig(model=model_config(MINILM_DIR),
                            scheduler=SchedulerConfig(max_batch_tokens=512, default_priority=100)))
    e.start()
    yield e
    e.shutdown()


def test_a_priority_0_request_overtakes_a_queued_bulk_request(engine):
    async def run():
        done: list[str] = []

        async def one(name, texts, priority):
            result = await engine.embed(texts, EmbedOptions(priority=priority))
            done.append(name)
            return result

        bulk = asyncio.create_task(one("bulk", BULK, None))  # the default priority, 100
        # Once the bulk inputs wait in line (and no sooner), the query arrives.
        await until_async(lambda: engine.waiting_by_priority().get(100, 0) > 100, "the bulk inputs in line")
        steps_before = engine.scheduler.stats.steps
        query = await one("query", ["what is a vector?"], 0)
        assert engine.waiting_by_priority().get(100, 0) > 0  # the bulk still waits: the query went past it
        await bulk
        return done, engine.scheduler.stats.steps - steps_before, query

    done, steps, query = asyncio.run(run())
    assert done == ["query", "bulk"]
    assert query.vectors.shape == (1, 384)
    assert steps >= 2


@pytest.mark.parametrize("priority", [-1, 1000, True, 2.5])
def test_a_priority_outside_0_to_999_is_a_400_naming_it(engine, priority):
    with pytest.raises(InvalidRequest) as caught:
        asyncio.run(engine.embed(["a"], EmbedOptions(priority=priority)))
    assert caught.value.param == "priority"


def test_rerank_and_classify_take_a_priority(tmp_path):
    from tiny import build_tiny_cross_encoder

    build_tiny_cross_encoder(tmp_path / "ce", "bert", seed=2)
    e = Engine(EngineConfig(model=model_config(tmp_path / "ce")))
    e.start()
    try:
        first = asyncio.run(e.score([("q", "a document")], priority=0))
        assert asyncio.run(e.score([("q", "a document")], priority=999)).vectors.tolist() == first.vectors.tolist()
        with pytest.raises(InvalidRequest) as caught:
            asyncio.run(e.score([("q", "a document")], priority=1000))
        assert caught.value.param == "priority"
    finally:
        e.shutdown()
