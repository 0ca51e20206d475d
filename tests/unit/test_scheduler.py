"""The scheduler alone: pure Python, microseconds per test."""

from __future__ import annotations

import pytest

from embedserve.engine.scheduler import Entry, Scheduler
from embedserve.errors import Overloaded


def entries(rid: int, *lengths: int) -> list[Entry]:
    return [Entry(rid, i, n) for i, n in enumerate(lengths)]


def make(tokens: int = 100, requests: int = 8, queue: int = 1000) -> Scheduler:
    return Scheduler(max_batch_tokens=tokens, max_batch_requests=requests, max_queue=queue)


def ids(step) -> list[tuple[int, int]]:
    return [(e.request_id, e.index) for e in step.entries]


def test_every_input_is_an_entry_packed_fifo_up_to_the_token_budget():
    s = make(tokens=100)
    s.add(1, entries(1, 30, 30))
    s.add(2, entries(2, 30, 30))
    step = s.schedule()
    assert ids(step) == [(1, 0), (1, 1), (2, 0)]
    assert step.num_tokens == 90
    assert ids(s.schedule()) == [(2, 1)]
    assert s.schedule() is None


def test_sequence_budget_caps_a_step():
    s = make(tokens=10_000, requests=3)
    s.add(1, entries(1, *[5] * 7))
    assert [len(s.schedule().entries) for _ in range(3)] == [3, 3, 1]


def test_a_large_request_spans_several_steps_and_finishes_once():
    s = make(tokens=50)
    s.add(7, entries(7, *[20] * 5))
    finished = []
    steps = 0
    while (step := s.schedule()) is not None:
        steps += 1
        finished += s.complete(step)
    assert steps == 3
    assert finished == [7]


def test_later_small_entries_fill_the_budget_behind_the_head():
    s = make(tokens=100)
    s.add(1, entries(1, 60))
    s.add(2, entries(2, 60))  # does not fit next to request 1
    s.add(3, entries(3, 30))  # does
    assert ids(s.schedule()) == [(1, 0), (3, 0)]
    assert ids(s.schedule()) == [(2, 0)]


def test_no_input_starves_under_a_stream_of_small_ones():
    s = make(tokens=100)
    s.add(0, entries(0, 90))
    big_done = None
    for n in range(1, 50):
        s.add(n, entries(n, 20))  # a steady stream that would always fit before the big one
        step = s.schedule()
        if (0, 0) in ids(step):
            big_done = n
        s.complete(step)
        if big_done:
            break
    s.add(100, entries(100, 95))
    s.add(101, entries(101, 10))
    # The long one at the head always goes first: it is never passed over.
    assert big_done == 1
    while (step := s.schedule()) is not None:
        if (100, 0) in ids(step):
            assert ids(step)[0] == (100, 0)
            break
        s.complete(step)
    else:
        pytest.fail("the 95-token input was never scheduled")


def test_new_arrivals_join_the_very_next_step():
    s = make(tokens=100)
    s.add(1, entries(1, 10))
    first = s.schedule()
    s.add(2, entries(2, 10))  # arrives while step 1 runs
    assert ids(s.schedule()) == [(2, 0)]
    s.complete(first)


def test_abort_drops_pending_entries_and_keeps_the_rest():
    s = make(tokens=20)
    s.add(1, entries(1, 10, 10, 10, 10))
    s.add(2, entries(2, 10))
    running = s.schedule()
    assert ids(running) == [(1, 0), (1, 1)]
    assert s.abort(1) == 2
    assert s.stats.waiting_inputs == 1 and s.stats.waiting_tokens == 10
    assert s.complete(running) == []  # an aborted request never reports as finished
    assert ids(s.schedule()) == [(2, 0)]
    assert s.abort(1) == 0  # unknown by now


def test_full_queue_is_overloaded_and_all_or_nothing():
    s = make(queue=5)
    s.add(1, entries(1, 1, 1, 1))
    with pytest.raises(Overloaded) as err:
        s.add(2, entries(2, 1, 1, 1))
    assert err.value.status == 429
    assert s.stats.waiting_inputs == 3  # nothing of request 2 was queued
    s.add(3, entries(3, 1, 1))
    step = s.schedule()
    # Running inputs still count until they complete.
    with pytest.raises(Overloaded):
        s.add(4, entries(4, 1))
    s.complete(step)
    s.add(4, entries(4, 1))


def test_an_entry_that_can_never_fit_is_a_bug_not_a_hang():
    s = make(tokens=100)
    with pytest.raises(ValueError, match="can never be scheduled"):
        s.add(1, entries(1, 101))


def test_empty_queue_schedules_nothing():
    assert make().schedule() is None
