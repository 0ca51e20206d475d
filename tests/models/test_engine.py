"""The async engine front and its thread, on a tiny random BERT."""

from __future__ import annotations

import asyncio
import base64
import itertools
import threading
import time

import pytest
import torch

from on_device import DEVICE, model_config
from polling import until
from tiny import build_tiny_encoder
from embedserve.config import EngineConfig, SchedulerConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import (
    ConfigError,
    ContextLengthExceeded,
    EngineError,
    EngineFailed,
    InputTooLarge,
    InvalidRequest,
    Overloaded,
)

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-engine")
    build_tiny_encoder(path, "bert", seed=9)
    return path


@pytest.fixture
def engine(tiny_dir, request):
    kw = getattr(request, "param", {})
    e = Engine(EngineConfig(model=model_config(tiny_dir), **kw))
    e.start()
    yield e
    e.shutdown(timeout=10)


class Gate:
    """Wraps Runner.launch so a test can hold the engine thread inside a forward pass."""

    def __init__(self, engine: Engine) -> None:
        self.real = engine.runner.launch
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []  # inputs per step
        engine.runner.launch = self

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

    def spy(texts, **kw):
        seen.append(threading.current_thread().name)
        return real(texts, **kw)

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
    e = Engine(EngineConfig(model=model_config(tiny_dir), scheduler=SchedulerConfig(max_batch_tokens=512)))
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
        Engine(EngineConfig(model=model_config(tiny_dir), scheduler=SchedulerConfig(max_batch_tokens=100)))


# -- faults -------------------------------------------------------------------------------------------------------


class Recorder:
    """A StepObserver that remembers what the engine reported."""

    def __init__(self) -> None:
        self.splits: list[int] = []
        self.failed: list[int] = []

    def step(self, inputs, tokens, seconds) -> None:
        pass

    def step_failed(self, inputs) -> None:
        self.failed.append(inputs)

    def step_split(self, inputs) -> None:
        self.splits.append(inputs)


async def queue_in_order(engine: Engine, groups) -> list[asyncio.Task]:
    """One request per group, each queued before the next is sent: the scheduler sees them in this order."""
    tasks, queued = [], 0
    for inputs in groups:
        tasks.append(asyncio.create_task(engine.embed(inputs)))
        queued += len(inputs)
        while engine.scheduler.stats.waiting_inputs < queued:
            await asyncio.sleep(0.01)
    return tasks


def faulty_engine(tiny_dir, kind: str, **kw) -> tuple[Engine, Recorder, list]:
    fatal: list[BaseException] = []
    rec = Recorder()
    config = EngineConfig(model=model_config(tiny_dir), fault_marker="too big", fault_kind=kind, **kw)
    e = Engine(config, rec, on_fatal=fatal.append)
    e.start()
    return e, rec, fatal


def test_out_of_memory_splits_the_step_and_refuses_only_the_input_that_does_not_fit(tiny_dir):
    e, rec, _ = faulty_engine(tiny_dir, "oom")
    gate = Gate(e)
    try:
        async def run():
            first = asyncio.create_task(e.embed(["first"]))
            await wait_for(gate.entered)
            a, b, c = await queue_in_order(e, (["alpha one", "alpha two"], ["bravo", "too big"], ["charlie"]))
            gate.release.set()
            return await asyncio.gather(first, a, b, c, return_exceptions=True)

        first, a, b, c = asyncio.run(run())
        # The 5-input step ran out of memory (before reaching the runner), then ran in parts without the input
        # that does not fit on its own.
        assert rec.splits == [5] and rec.failed == []
        assert gate.calls[0] == 1 and sum(gate.calls[1:]) == 4 and max(gate.calls[1:]) < 5
        assert isinstance(b, InputTooLarge) and b.status == 400 and "--max-batch-tokens" in b.message
        # Requests that merely shared the step are answered, with the vectors they get alone.
        alone = asyncio.run(e.embed(["alpha one", "alpha two", "charlie"])).vectors
        torch.testing.assert_close(torch.cat([a.vectors, c.vectors]), alone, atol=1e-5, rtol=0)
        assert asyncio.run(e.embed(["bravo"])).vectors.shape == (1, 36)  # still serving
    finally:
        e.shutdown(timeout=10)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_fatal_device_error_stops_the_engine_and_answers_every_request_held(tiny_dir, depth):
    e, rec, fatal = faulty_engine(tiny_dir, "fatal", scheduler=SchedulerConfig(max_batch_requests=2))
    e.worker._depth = depth
    gate = Gate(e)
    try:
        async def run():
            first = asyncio.create_task(e.embed(["first"]))
            await wait_for(gate.entered)
            f, g, h = await queue_in_order(e, (["too big"], ["golf"], ["hotel", "india", "juliet", "kilo"]))
            gate.release.set()
            return await asyncio.wait_for(asyncio.gather(first, f, g, h, return_exceptions=True), 30)

        first, f, g, h = asyncio.run(run())
        if depth == 1:
            assert first.vectors.shape == (1, 36)
        else:  # still in flight when the device failed: nothing of it can be trusted
            assert isinstance(first, EngineError)
        # The failing step (two inputs: "too big" and "golf") gets 500; what waited behind it, 503.
        assert isinstance(f, EngineError) and isinstance(g, EngineError) and f.status == 500
        assert isinstance(h, EngineFailed) and h.status == 503
        assert len(fatal) == 1 and "illegal memory access" in str(fatal[0])
        with pytest.raises(EngineFailed):
            asyncio.run(e.embed(["after"]))
        e.worker._thread.join(10)
        assert not e.worker._thread.is_alive()
    finally:
        e.shutdown(timeout=10)


@pytest.mark.parametrize("engine", [{"fault_marker": "boom"}], indirect=True)
def test_an_ordinary_failure_is_not_fatal(engine):
    with pytest.raises(EngineError):
        asyncio.run(engine.embed(["boom"]))
    assert engine.worker._dead is None
    assert asyncio.run(engine.embed(["fine"])).vectors.shape == (1, 36)


# -- two steps in flight -------------------------------------------------------------------------------------------


def test_two_steps_in_flight_give_the_vectors_of_one_at_a_time(tiny_dir):
    """The CUDA pipeline's bookkeeping, run on the CPU: the next step is launched before the last is delivered."""
    texts = [f"text number {i} " * (1 + i % 7) for i in range(60)]
    out = {}
    for depth in (1, 2):
        e = Engine(EngineConfig(model=model_config(tiny_dir), scheduler=SchedulerConfig(max_batch_tokens=512,
                                                                                               max_batch_requests=8)),
                   pipeline_depth=depth)
        e.start()
        in_flight = []
        real = e.runner.collect

        def spy(handle, real=real, e=e, seen=in_flight):
            seen.append(len(e.worker._inflight) + 1)  # this one plus those launched behind it
            return real(handle)

        e.runner.collect = spy

        async def go(e=e):
            return await asyncio.gather(*(e.embed([t], EmbedOptions(encodings=("base64",))) for t in texts))

        try:
            results = asyncio.run(go())
        finally:
            e.shutdown(timeout=10)
        out[depth] = results
        assert max(in_flight) == depth
    for one, two in zip(out[1], out[2]):
        torch.testing.assert_close(two.vectors, one.vectors, atol=1e-6, rtol=0)
        assert two.base64 == [base64.b64encode(two.vectors[0].numpy().tobytes())]


def test_ids_past_the_embedding_table_are_refused_even_if_the_tokenizer_knows_them(tmp_path):
    build_tiny_encoder(tmp_path, "bert", seed=2, vocab_size=30000)  # MiniLM's tokenizer has 30522 tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    # Every token past 30000 is a word piece ("##x"): "a" + x tokenizes to [CLS], a, ##x, [SEP].
    word = next("a" + w[2:] for w, i in tok.vocab.items() if i >= 30000 and i in tok("a" + w[2:])["input_ids"])
    e = Engine(EngineConfig(model=model_config(tmp_path), token_ids="model"))
    e.start()
    try:
        with pytest.raises(InvalidRequest, match=r"vocabulary \(0..29999\)"):
            asyncio.run(e.embed([[101, 30100, 102]]))
        with pytest.raises(InvalidRequest, match="past the 30000 rows"):
            asyncio.run(e.embed(["fine", f"a {word} b"]))
        assert asyncio.run(e.embed(["fine"])).vectors.shape == (1, 36)
    finally:
        e.shutdown(timeout=10)


def test_an_idle_cpu_engine_hands_its_free_heap_back_once_per_burst(tiny_dir, monkeypatch):
    """After work, when the queue empties, the engine trims the C heap (glibc's malloc_trim): once, not on every
    idle wake-up, and never without work since the last trim; never on CUDA (its allocator is torch's)."""
    import embedserve.engine.worker as worker

    calls = []
    monkeypatch.setattr(worker, "release_host_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(worker, "TRIM_INTERVAL_S", 0.0)
    e = Engine(EngineConfig(model=model_config(tiny_dir)))
    loops = []  # the engine thread frees released caches once per pass of its loop, idle passes included
    real_free = e.worker.runner.free
    e.worker.runner.free = lambda released: loops.append(True) or real_free(released)
    expected = 1 if e.device.type == "cpu" else 0

    def idle_passes(n: int = 2) -> None:
        """Wake the idle engine thread ``n`` times (a cancel of no request) and wait for each pass of its loop:
        a trim it wrongly thought due would have run within them."""
        for _ in range(n):
            seen = len(loops)
            e.worker.cancel(-1)
            until(lambda: len(loops) > seen, "the engine thread passed its idle loop")

    e.start()
    try:
        idle_passes()
        assert calls == []  # nothing ran yet
        asyncio.run(e.embed(["hello", "world"]))
        until(lambda: len(calls) >= expected, "the heap trimmed after work")
        idle_passes()
        assert len(calls) == expected  # once, not on every idle wake-up
        asyncio.run(e.embed(["again"]))
        until(lambda: len(calls) >= 2 * expected, "trimmed again after new work")
        idle_passes()
        assert len(calls) == 2 * expected
    finally:
        e.shutdown(timeout=10)


def test_on_the_cpu_one_compute_thread_loads_warms_and_runs_every_step(tiny_dir, monkeypatch):
    """On the CPU, the model's loading, warm-up and forward passes all run on the one compute thread
    (engine.compute), never on the caller's thread nor on the engine thread: only that thread starts OpenMP
    teams (why: benchmarks/bench_engine.py, and the module's docstring)."""
    if DEVICE.type != "cpu":
        pytest.skip("CUDA engines launch their kernels from their own engine thread")
    import embedserve.engine.front as front

    seen: dict[str, set[int]] = {"load": set(), "warm_up": set(), "launch": set()}
    for name in ("load", "warm_up"):
        real = getattr(front, name)
        monkeypatch.setattr(front, name, lambda *a, _real=real, _name=name, **k:
                            seen[_name].add(threading.get_ident()) or _real(*a, **k))
    e = Engine(EngineConfig(model=model_config(tiny_dir)))
    real_launch = e.runner.launch
    e.runner.launch = lambda *a: seen["launch"].add(threading.get_ident()) or real_launch(*a)
    e.warmup()
    e.start()
    try:
        asyncio.run(e.embed(["one", "two three"]))
        asyncio.run(e.embed(["four"]))
    finally:
        e.shutdown(timeout=10)
    threads = set().union(*seen.values())
    assert all(seen.values()) and len(threads) == 1, seen
    assert threads.isdisjoint({threading.get_ident(), e.worker._thread.ident})


def test_on_the_cpu_a_requests_own_torch_work_runs_on_the_compute_thread_too(tiny_dir, monkeypatch):
    """After its steps, a request's own torch work (a second output type's encoding, long_input mean's window
    means) runs on the compute thread, not on the event loop's: a parallel op there would start a second OpenMP
    team (engine.compute). The answers are those of the same work done here."""
    if DEVICE.type != "cpu":
        pytest.skip("CUDA engines do it on the event loop, as before")
    import embedserve.engine.front as front
    from embedserve.engine import compute

    threads = set()
    real = front.encode_rows
    monkeypatch.setattr(front, "encode_rows", lambda *a: threads.add(threading.get_ident()) or real(*a))
    e = Engine(EngineConfig(model=model_config(tiny_dir)))
    e.start()
    try:
        long_text = "word " * (3 * e.max_length)
        two = asyncio.run(e.embed(["short", "a little longer text"],
                                  EmbedOptions(dimensions=32, encodings=("base64", "ubinary"))))
        mean = asyncio.run(e.embed([long_text, "short"], EmbedOptions(long_input="mean", encodings=("base64",))))
        compute_thread = compute.call(threading.get_ident)
    finally:
        e.shutdown(timeout=10)
    assert threads == {compute_thread}
    assert two.encoded["ubinary"] == real(two.vectors, "ubinary", None)
    assert mean.encoded["base64"] == real(mean.vectors, "base64", None)
    assert mean.token_counts[0] > e.max_length  # the long text ran as several windows


def test_release_host_memory_returns_freed_pages_to_the_os():
    """The real call: a heap full of freed small blocks shrinks once trimmed."""
    import re

    from embedserve.engine.device import release_host_memory

    def rss_kib() -> int:
        return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))

    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 256 MB in blocks below glibc's mmap threshold
    keep = blocks[-1]
    del blocks  # freed, but glibc keeps them (the last block pins the heap's top)
    before = rss_kib()
    assert release_host_memory()
    assert before - rss_kib() > 100 * 1024, "malloc_trim returned less than 100 MB"
    del keep


@pytest.mark.skipif(torch.device(model_config("x").device).type != "cpu", reason="the CPU's dtype choice")
def test_start_up_names_the_cpu_and_warns_for_an_emulated_half_precision(tiny_dir, monkeypatch, caplog):
    """On a CPU without native bf16 (mocked: an AVX2-only Zen 3), auto serves float32, and an explicit bfloat16
    starts, with a warning that says it is emulated and what the probe measured."""
    import logging

    from embedserve.engine import cpu

    monkeypatch.setattr(cpu, "read_cpu", lambda: cpu.CpuInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"})))
    monkeypatch.setattr(cpu, "matmul_gflops", lambda dtype: 1.0 if dtype != torch.float32 else 100.0)
    caplog.set_level(logging.INFO, logger="embedserve.engine.loading")
    auto = Engine(EngineConfig(model=model_config(tiny_dir, dtype="auto")))
    assert auto.dtype == torch.float32
    assert "cpu: AMD EPYC 7B13" in caplog.text and "dtype float32 (auto: no native bf16)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    half = Engine(EngineConfig(model=model_config(tiny_dir, dtype="bfloat16")))
    assert half.dtype == torch.bfloat16
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bfloat16 is emulated" in w and "(100x slower)" in w for w in warnings), warnings
    for e in (auto, half):
        e.shutdown(timeout=10)


def test_a_warm_up_that_fails_in_other_words_still_names_the_budget_flag(tiny_dir):
    """Short of memory, oneDNN fails primitive creation in its own words, not as an out-of-memory: the start-up
    error still names the step and the flag that sizes it."""
    from embedserve.errors import ConfigError

    e = Engine(EngineConfig(model=model_config(tiny_dir)))

    def fail(*args, **kw):
        raise RuntimeError("could not create a primitive")

    e.runner.run = fail
    with pytest.raises(ConfigError, match=r"warm-up pass of \d+ tokens failed \(RuntimeError: could not create a "
                                          r"primitive\); if memory is short here, lower --max-batch-tokens \(now "):
        e.warmup()
    e.shutdown(timeout=10)


def test_the_cpu_engine_measures_its_linear_and_attention_choices_and_logs_them(minilm_dir, caplog, monkeypatch):
    """Whether the fused GEMM beats F.linear, and from which length one attention call per sequence beats
    bucketing, are measured for this model on this CPU (the warm-up's full step decides the GEMMs). The
    attention measurement (its rule has its own tests) is replaced by one answering 48 for MiniLM's shape, to
    see that its answer is the one the model runs with and the log reports."""
    from embedserve.config import ModelConfig
    from embedserve.engine import loading

    asked = []

    def measured(shape, dtype):
        asked.append((shape.heads, shape.head_dim, shape.causal, dtype))
        return 48, "16: 1.0/2.0 ms"

    monkeypatch.setattr(loading, "measure_solo_min", measured)
    caplog.set_level("INFO", logger="embedserve")
    engine = Engine(EngineConfig(model=ModelConfig(path=str(minilm_dir), device="cpu", dtype="float32")))
    if engine.linear_plan.default == "torch":
        pytest.skip("no fused GEMM on this CPU: nothing to choose between")
    engine.warmup()
    words = caplog.text.split("linear layers: measured per shape: ")[1].splitlines()[0]
    for shape in ("384->1152", "384->384", "384->1536+gelu", "1536->384"):  # MiniLM's four layer shapes
        assert shape + " " in words, words
    assert len(engine.linear_plan.chosen) == 4
    assert asked == [(12, 32, False, torch.float32)]  # MiniLM: 12 heads of 32, bidirectional
    assert engine.model.encoder.kernels.solo_min == 48
    assert "attention: sequences of 48 tokens or more run one call each" in caplog.text
    engine.shutdown()


def test_work_waiting_for_the_tokenizer_is_bounded_and_a_gone_client_stops_its_long_texts(engine, monkeypatch):
    """Requests accepted but not yet tokenized count against MAX_PENDING_CHARS: past it a 429 at once, never an
    unbounded heap behind the pool. A request cancelled while its long text is read stops at the next window."""
    from embedserve.engine import front
    from embedserve.engine.tokenizer import Abandoned

    monkeypatch.setattr(front, "MAX_PENDING_CHARS", 100_000)
    inside, release, outcome = threading.Event(), threading.Event(), []
    real = engine._prep.texts

    def held(*args):
        inside.set()
        assert release.wait(30)
        try:
            return real(*args)
        except Abandoned:
            outcome.append("abandoned")
            raise

    monkeypatch.setattr(engine._prep, "texts", held)
    long = "word " * 19_000  # 95,000 characters: read window by window

    async def run():
        first = asyncio.ensure_future(engine.embed([long]))
        while not inside.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="wait for the tokenizer"):
            await engine.embed(["x" * 10_000])  # 95,000 + 10,000 > 100,000
        first.cancel()  # the client went away while its text waited for the pool
        with pytest.raises(asyncio.CancelledError):
            await first
        assert engine._pending_chars == 0
        release.set()
        deadline = time.monotonic() + 30
        while not outcome and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        monkeypatch.setattr(engine._prep, "texts", real)
        return await engine.embed(["x" * 10_000])  # the bound is free again

    result = asyncio.run(run())
    assert outcome == ["abandoned"] and result.vectors.shape[0] == 1


def test_a_kernel_that_refuses_the_device_at_warm_up_is_named_with_its_flag(tiny_dir, monkeypatch):
    """FlashAttention below sm_80 fails inside the warm-up pass: the message names the attention kernel and
    --attention sdpa, not the batch budget (issue 25)."""
    engine = Engine(EngineConfig(model=model_config(tiny_dir)))

    def refuse(*args, **kw):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(engine.runner, "run", refuse)
    with pytest.raises(ConfigError, match=r"attention kernel, which does not run on this device.*--attention sdpa"):
        engine.warmup()
    monkeypatch.setattr(engine.runner, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(ConfigError, match="--max-batch-tokens"):  # anything else still names the budget
        engine.warmup()


def test_every_staged_segment_starts_on_16_bytes_whatever_the_step(engine):
    """Triton specialises its kernels on pointer alignment: the step's views (ids, positions, cu_seqlens, the
    key offsets, dims, normalize flags, encodings, range rows, their offsets, token types) must start 16-byte
    aligned for every token and input count, or steps of new shapes compile new variants under traffic (issue
    25). The packed values are checked too."""
    import random

    rng = random.Random(3)
    for _ in range(50):
        B = rng.randint(1, 9)
        inputs = [[rng.randint(5, 99) for _ in range(rng.randint(1, 23))] for _ in range(B)]
        starts = [rng.randint(0, 7) for _ in range(B)] if rng.random() < 0.5 else None
        types = [rng.randint(0, len(x)) for x in inputs] if rng.random() < 0.5 else None
        codes = [rng.randint(0, 5) for _ in range(B)]
        rows = [rng.randint(0, 2) for _ in range(B)]
        st = engine.runner._stage(inputs, [8] * B, [True] * B, codes, rows, starts, types)
        views = [st.ids, st.positions, st.cu, st.dims, st.normalize, st.encodings, st.range_rows, st.enc_offsets]
        views += [v for v in (st.cu_k, st.token_types) if v is not None]
        assert all(v.data_ptr() % 16 == 0 for v in views), [v.data_ptr() % 16 for v in views]
        assert st.ids.tolist() == [t for x in inputs for t in x]
        assert st.encodings.tolist() == codes and st.range_rows.tolist() == rows
        sizes = [{0: 0, 1: 44, 2: 8, 3: 8, 4: 1, 5: 1}[c] for c in codes]  # base64 of 32 bytes: 44 characters
        assert st.enc_offsets.tolist() == st.offsets == [0, *itertools.accumulate(sizes)]
        lengths = [len(x) for x in inputs]
        assert st.cu.tolist() == [0, *itertools.accumulate(lengths)]
        first = [0 if starts is None else starts[i] for i in range(B)]
        assert st.positions.tolist() == [first[i] + j for i, n in enumerate(lengths) for j in range(n)]
        if types is not None:
            want = [int(first[i] + j >= types[i]) for i, n in enumerate(lengths) for j in range(n)]
            assert st.token_types.tolist() == want  # type 1 from the second text's position in its input on


def test_steps_of_every_shape_launch_the_one_triton_variant_the_warm_up_compiled(tiny_dir, monkeypatch):
    """Triton compiles one variant per specialisation key (each pointer's type and 16-byte alignment, each
    integer's type, its divisibility by 16 and whether it is 1, the constexprs): the key of every pool+encode
    launch, computed with Triton's own ``native_specialize_impl``, is the warm-up's for 50 steps of random
    sizes, base64 flags, dimensions and normalisation. Fails on an unaligned staging layout (``_ALIGN = 1``)."""
    import random

    pytest.importorskip("triton")  # in the lock: the suite always has it
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from embedserve.kernels import pool_encode

    keys: list[tuple] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                keys.append((tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in args),
                             tuple(sorted(kw.items()))))
                return self.kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(pool_encode, "_pool_encode_kernel", Recorder(pool_encode._pool_encode_kernel))
    engine = Engine(EngineConfig(model=model_config(tiny_dir, pool_kernel="triton")))
    assert engine.loaded.pool_backend == "triton"
    engine.warmup()
    warm = set(keys)
    assert len(warm) == 1, warm
    engine.start()
    rng = random.Random(5)
    try:
        for _ in range(50):
            texts = ["word " * rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
            dims = rng.choice([None, 4, 8, 12])
            encodings = rng.choice([(), ("base64",), ("int8",), ("uint8", "binary"), ("ubinary",)])
            if (dims or engine.dimensions) % 8 and {"binary", "ubinary"} & set(encodings):
                encodings = ("int8",)
            options = EmbedOptions(dimensions=dims, normalize=rng.choice([None, False]), encodings=encodings)
            asyncio.run(engine.embed(texts, options))
    finally:
        engine.shutdown()
    assert len(keys) >= len(warm) + 50
    assert set(keys) == warm, set(keys) - warm


def test_a_triton_kernel_that_cannot_be_built_here_is_named_with_what_is_missing_and_its_flag(tiny_dir, monkeypatch):
    """Triton builds a C launcher at the first launch: without a compiler, Python's headers or libcuda the
    warm-up says so and names --pool-kernel torch, never the batch budget (issue 25)."""
    import dataclasses

    from embedserve.engine.warmup import warm_up

    engine = Engine(EngineConfig(model=model_config(tiny_dir)))
    loaded = dataclasses.replace(engine.loaded, pool_backend="triton")

    def no_compiler(*args, **kw):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(engine.runner, "run", no_compiler)
    with pytest.raises(ConfigError, match=r"could not build the Triton pool\+encode kernel.*--pool-kernel torch"):
        warm_up(loaded)
    with pytest.raises(ConfigError, match="--max-batch-tokens"):  # the torch twin has no launcher to build
        warm_up(dataclasses.replace(engine.loaded, pool_backend="torch"))
