"""The compute thread (embedserve.engine.compute): calls from any thread run there, one at a time, in order."""

from __future__ import annotations

import threading

import pytest

from embedserve.engine import compute


def test_calls_from_several_threads_run_on_one_other_thread_one_at_a_time():
    ran: list[tuple[int, int]] = []
    busy = threading.Lock()

    def job(i: int) -> int:
        assert busy.acquire(blocking=False), "two calls ran at once"
        try:
            ran.append((i, threading.get_ident()))
            return i * i
        finally:
            busy.release()

    answers: dict[int, int] = {}
    callers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, compute.call(job, i))) for i in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(10)
    assert answers == {i: i * i for i in range(8)}
    threads = {t for _, t in ran}
    assert len(threads) == 1 and threads.isdisjoint({threading.get_ident()} | {t.ident for t in callers})
    assert compute.call(compute.on_compute_thread) and not compute.on_compute_thread()


def test_a_nested_call_runs_inline_and_an_exception_reaches_the_caller():
    def outer():
        return compute.call(threading.get_ident), threading.get_ident()

    inner, outer_thread = compute.call(outer)
    assert inner == outer_thread  # no deadlock: the compute thread did not wait for itself

    def fail():
        raise KeyError("no such thing")

    with pytest.raises(KeyError, match="no such thing"):
        compute.call(fail)
    assert compute.call(lambda: 42) == 42  # the thread goes on after a failure


def test_a_routed_object_calls_its_methods_there_and_reads_its_data_here():
    class Target:
        size = 3

        def where(self, plus: int = 0) -> int:
            return threading.get_ident() + plus

    routed = compute.OnComputeThread(Target())
    assert routed.size == 3
    assert routed.where(plus=0) == compute.call(threading.get_ident) != threading.get_ident()
