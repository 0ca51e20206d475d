"""Warm-up: the shapes serving will run, run once before ``/ready`` turns 200, so that a budget the device cannot
hold fails at boot, naming the flag to lower, instead of inside the first requests."""

from __future__ import annotations

import logging
import time

from embedserve.engine.device import bind_thread
from embedserve.engine.faults import classify
from embedserve.engine.loading import Loaded
from embedserve.engine.runner import Chunk
from embedserve.errors import ConfigError

log = logging.getLogger(__name__)

# How CUDA kernels say that they do not run on this GPU or dtype (FlashAttention below sm_80, a wheel without
# kernels for this architecture): not a budget problem, so the message names the kernel's flag instead.
_REFUSALS = ("only supports ampere", "flashattention only supports", "no kernel image is available",
             "sm_80", "compute capability", "not supported on this gpu", "unsupported gpu")

# How Triton says that it cannot build its launcher: no compiler, no Python headers, no libcuda to link.
_NO_LAUNCHER = ("failed to find c compiler", "cannot find -lcuda", "python.h", "libcuda.so",
                "compilation failed", "calledprocesserror", "cc: not found", "gcc: not found")


def cannot_build_triton(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(words in text for words in _NO_LAUNCHER)


def refuses_device(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(words in text for words in _REFUSALS)


def warm_up(loaded: Loaded) -> None:
    """Run the shapes serving will run before the first request: a full ``max_batch_tokens`` pass, and for
    chunking models a long input in chunks over its key cache (on CUDA the longest input the model takes,
    beside full steps, with the rest of ``--max-kv-tokens`` held). A budget the device cannot hold fails
    here, at boot, naming the flag to lower."""
    bind_thread(loaded.device)
    step = loaded.budgets.max_batch_tokens
    ids = loaded.tokenizer.encode(["warm up " * loaded.max_length], truncate=True)[0]
    ids = ids[: min(len(ids), step)]
    count = max(1, min(step // len(ids), loaded.scheduler.max_batch_requests))
    started = time.perf_counter()
    try:
        loaded.runner.run([ids] * count, [loaded.model.dimensions] * count, [False] * count)
    except Exception as e:
        if classify(e) == "oom":
            raise ConfigError(
                f"warm-up pass of {count * len(ids)} tokens ran out of {loaded.device.type.upper()} memory; lower "
                f"--max-batch-tokens (now {step}): {e}"
            ) from e
        if loaded.pool_backend == "triton" and cannot_build_triton(e):
            raise ConfigError(
                f"warm-up could not build the Triton pool+encode kernel here ({type(e).__name__}: {e}); Triton "
                "compiles a small C launcher at its first launch and needs a C compiler, Python's headers and "
                "libcuda (the CUDA image has them): install them, or start with --pool-kernel torch"
            ) from e
        if refuses_device(e):
            raise ConfigError(
                f"warm-up failed in the {loaded.kernels.attention} attention kernel, which does not run on this "
                f"device ({type(e).__name__}: {e}); start with --attention sdpa, or a --dtype it takes"
            ) from e
        # Short of memory, oneDNN fails in its own words ("could not create a primitive"): the largest step
        # is what the budget decides, so the flag is named whatever the cause.
        raise ConfigError(
            f"warm-up pass of {count * len(ids)} tokens failed ({type(e).__name__}: {e}); if memory is short "
            f"here, lower --max-batch-tokens (now {step})"
        ) from e
    log.info("warm-up: %d inputs, %d tokens in %.2fs", count, count * len(ids), time.perf_counter() - started)
    if loaded.kernels.linear.probe:
        log.info("linear layers: %s", loaded.kernels.linear.describe())
    if loaded.budgets.chunk_tokens is not None and loaded.max_length > loaded.budgets.chunk_tokens:
        _warm_up_chunks(loaded)


def _warm_up_chunks(loaded: Loaded) -> None:
    chunk, cuda = loaded.budgets.chunk_tokens, loaded.device.type == "cuda"
    step, kv = loaded.budgets.max_batch_tokens, loaded.budgets.max_kv_tokens
    # On the CPU memory is not what can fail: two chunks exercise the path. On CUDA, the worst case.
    length = loaded.max_length if cuda else min(loaded.max_length, chunk + 1)
    ids = loaded.tokenizer.encode(["warm up " * length], truncate=True)[0]
    ids = (ids * (length // len(ids) + 1))[:length]
    filler = ids[:chunk]
    key = ("warm-up",)
    started = time.perf_counter()
    reserve = None
    try:
        if cuda and kv > length:
            # The key caches of other long inputs in progress, which the budget allows at the same time.
            reserve = loaded.model.encoder.new_cache(kv - length, loaded.device)
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            fill = (step - n) // chunk if cuda else 0
            inputs = [ids[start : start + n]] + [filler] * fill
            chunks = [Chunk(key, start, length, start + n == length)] + [None] * fill
            B = len(inputs)
            loaded.runner.run(inputs, [loaded.model.dimensions] * B, [False] * B, [False] * B, chunks)
    except Exception as e:
        if classify(e) != "oom":
            raise
        raise ConfigError(
            f"warm-up of a {length}-token input in chunks of {chunk} beside full steps of "
            f"{step} tokens, with {kv} key-cache tokens held, ran out of "
            f"{loaded.device.type.upper()} memory; lower --max-kv-tokens (now {kv}) or "
            f"--max-batch-tokens (now {step}): {e}"
        ) from e
    finally:
        loaded.runner.free([key])
        del reserve
    log.info("warm-up: a %d-token input in chunks of %d over its key cache in %.2fs", length, chunk,
             time.perf_counter() - started)
