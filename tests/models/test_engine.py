"""The async engine front and its thread, on a tiny random BERT."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from tiny import build_tiny_encoder
from embedserve.config import EngineConfig, ModelConfig, SchedulerConfig
from embedserve.engine.front import EmbedOptions, Engine
from embedserve.errors import ConfigError, ContextLengthExceeded, EngineError, InvalidRequest, Overloaded


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-engine")
    build_tiny_encoder(path, "bert", seed=9)
    return path


@pytest.fixture
def engine(tiny_dir, request):
    kw = getattr(request, "param", {})
    e = Engine(EngineConfig(model=ModelConfig(path=str(tiny_dir)), **kw))
    e.start()
    yield e
    e.shutdown(timeout=10)


class Gate:
    """Wraps Runner.run so a test can hold the engine thread inside a forward pass."""

    def __init__(self, engine: Engine) -> None:
        self.real = engine.runner.run
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []  # inputs per step
        engine.runner.run = self

    def __call__(self, inputs, *args):
        self.calls.append(len(inputs))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return self.real(inputs, *args)


async def wait_for(event: threading.Event) -> None:
    await asyncio.get_running_loop().run_in_executor(None, event.wait, 30)


def test_arrivals_during_a_forward_pass_join_the_next_one(engine):
    gate = Gate(engine)

    async def run():
        first = asyncio.create_task(engine.embed(["first"]))
        await wait_for(gate.entered)
        later = [asyncio.create_task(engine.embed([f"later {i}", "x"])) for i in range(5)]
        while engine.scheduler.stats.waiting_inputs < 10:
            await asyncio.sleep(0.01)
        gate.release.set()
        await asyncio.gather(first, *later)

    asyncio.run(run())
    assert gate.calls == [1, 10]  # all five later requests shared exactly one next step


def test_a_failing_forward_fails_exactly_its_batch(engine):
    gate = Gate(engine)
    real = gate.real

    def boom(inputs, *args):
        if len(gate.calls) == 2:
            raise RuntimeError("injected fault")
        return real(inputs, *args)

    gate.real = boom

    async def run():
        a = asyncio.create_task(engine.embed(["a"]))
        await wait_for(gate.entered)
        b = asyncio.create_task(engine.embed(["b", "bb"]))
        c = asyncio.create_task(engine.embed(["c"]))
        while engine.scheduler.stats.waiting_inputs < 3:
            await asyncio.sleep(0.01)
        gate.release.set()
        return await asyncio.gather(a, b, c, return_exceptions=True)

    a, b, c = asyncio.run(run())
    assert a.vectors.shape == (1, 36)
    assert isinstance(b, EngineError) and isinstance(c, EngineError)
    assert "injected" not in b.message  # no internals leak to clients
    after = asyncio.run(engine.embed(["still serving"]))
    assert after.vectors.shape == (1, 36)


def test_cancelled_request_leaves_the_queue(engine):
    gate = Gate(engine)

    async def run():
        a = asyncio.create_task(engine.embed(["a"]))
        await wait_for(gate.entered)
        b = asyncio.create_task(engine.embed([f"b{i}" for i in range(20)]))
        while engine.scheduler.stats.waiting_inputs < 20:
            await asyncio.sleep(0.01)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert engine.scheduler.stats.waiting_inputs == 0
        assert engine.scheduler.stats.dropped_inputs == 20
        gate.release.set()
        await a

    asyncio.run(run())
    assert gate.calls == [1]


@pytest.mark.parametrize("engine", [{"scheduler": SchedulerConfig(max_queue=4)}], indirect=True)
def test_full_queue_is_overloaded(engine):
    gate = Gate(engine)

    async def run():
        a = asyncio.create_task(engine.embed(["a", "b", "c"]))
        await wait_for(gate.entered)
        with pytest.raises(Overloaded):
            await engine.embed(["d", "e"])
        gate.release.set()
        await a
        return await engine.embed(["d", "e"])

    assert asyncio.run(run()).vectors.shape == (2, 36)


@pytest.mark.parametrize("engine", [{"truncate": False}], indirect=True)
def test_no_truncate_refuses_long_input_with_both_lengths(engine):
    with pytest.raises(ContextLengthExceeded) as err:
        asyncio.run(engine.embed(["short", "word " * 600]))
    assert err.value.max_tokens == 512 and err.value.requested == 602
    assert "maximum context length is 512 tokens, however you requested 602 tokens" in err.value.message
    # The per-request option overrides the server's setting.
    r = asyncio.run(engine.embed(["word " * 600], EmbedOptions(truncate=True)))
    assert r.token_counts == [512]


def test_tokenisation_runs_off_the_event_loop(engine):
    seen = []
    real = engine.tokenizer.encode

    def spy(texts, *, truncate):
        seen.append(threading.current_thread().name)
        return real(texts, truncate=truncate)

    engine.tokenizer.encode = spy
    asyncio.run(engine.embed(["hello"]))
    assert seen and seen[0].startswith("embedserve-tokenize")


def test_dimensions_and_normalize_options(engine):
    full = asyncio.run(engine.embed(["matryoshka"], EmbedOptions(normalize=False))).vectors[0]
    cut = asyncio.run(engine.embed(["matryoshka"], EmbedOptions(dimensions=8))).vectors[0]
    assert cut.shape == (8,)
    torch.testing.assert_close(cut, full[:8] / full[:8].norm())
    unit = asyncio.run(engine.embed(["matryoshka"], EmbedOptions(normalize=True))).vectors[0]
    torch.testing.assert_close(unit, full / full.norm())
    with pytest.raises(InvalidRequest) as err:
        asyncio.run(engine.embed(["x"], EmbedOptions(dimensions=37)))
    assert err.value.param == "dimensions"


@pytest.mark.parametrize("engine", [{"token_ids": "model"}], indirect=True)
def test_token_id_inputs_in_model_vocabulary(engine):
    text = asyncio.run(engine.embed(["hello world"])).vectors[0]
    ids = engine.tokenizer.encode(["hello world"], truncate=True)[0]
    by_ids = asyncio.run(engine.embed([ids])).vectors[0]
    torch.testing.assert_close(by_ids, text)
    with pytest.raises(InvalidRequest, match=r"outside the served model's vocabulary \(0..30521\).*--token-ids cl100k"):
        asyncio.run(engine.embed([[101, 40000, 102]]))


def test_shutdown_finishes_queued_work(tiny_dir):
    e = Engine(EngineConfig(model=ModelConfig(path=str(tiny_dir)), scheduler=SchedulerConfig(max_batch_tokens=512)))
    e.start()
    gate = Gate(e)

    async def run():
        tasks = [asyncio.create_task(e.embed([f"text {i}"] * 40)) for i in range(4)]
        await wait_for(gate.entered)
        while e.scheduler.stats.waiting_inputs + e.scheduler.stats.running_inputs < 160:
            await asyncio.sleep(0.01)
        stopper = asyncio.get_running_loop().run_in_executor(None, e.shutdown, 30)
        gate.release.set()
        results = await asyncio.gather(*tasks)
        await stopper
        return results

    results = asyncio.run(run())
    assert [r.vectors.shape[0] for r in results] == [40] * 4


def test_batch_budget_below_the_model_maximum_is_refused_at_start(tiny_dir):
    with pytest.raises(ConfigError, match="--max-batch-tokens"):
        Engine(EngineConfig(model=ModelConfig(path=str(tiny_dir)), scheduler=SchedulerConfig(max_batch_tokens=100)))
