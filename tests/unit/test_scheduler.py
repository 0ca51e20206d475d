"""The scheduler alone: pure Python, microseconds per test."""

from __future__ import annotations

import pytest

from embedserve.config import SchedulerConfig
from embedserve.engine.scheduler import Budgets, Entry, Scheduler, resolve_budgets
from embedserve.errors import ConfigError, Overloaded


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


def chunked(tokens=100, chunk=25, kv=300, requests=16, queue=1000) -> Scheduler:
    return Scheduler(max_batch_tokens=tokens, max_batch_requests=requests, max_queue=queue, chunk_tokens=chunk,
                     max_kv_tokens=kv)


def work(step) -> list[tuple[int, int, int]]:
    return [(w.entry.request_id, w.start, w.length) for w in step.items]


def test_a_long_input_runs_chunk_by_chunk_with_short_ones_packed_beside_it():
    s = chunked()
    s.add(1, entries(1, 110))  # 5 chunks of 25, 25, 25, 25, 10
    steps = []
    arrivals = iter(range(2, 100))
    while (step := s.schedule()) is not None:
        steps.append(work(step))
        if len(steps) < 4:  # a short request arrives during each of the first passes
            rid = next(arrivals)
            s.add(rid, entries(rid, 20))
        s.complete(step)
    long_chunks = [(a, b, c) for st in steps for (a, b, c) in st if a == 1]
    assert long_chunks == [(1, 0, 25), (1, 25, 25), (1, 50, 25), (1, 75, 25), (1, 100, 10)]
    # Each short request rode in the very next step, next to a chunk of the long one.
    for i, st in enumerate(steps[1:4], start=2):
        assert (i, 0, 20) in st and any(a == 1 for a, _, _ in st)


def test_chunks_take_at_most_half_the_budget_while_others_wait():
    s = chunked(tokens=100, chunk=50, kv=1000)
    s.add(1, entries(1, 400))
    s.add(2, entries(2, 400))
    first = s.schedule()
    assert work(first) == [(1, 0, 50), (2, 0, 50)]  # both start: nothing else waits yet
    s.complete(first)
    s.add(3, entries(3, 40))
    second = s.schedule()
    # With request 3 waiting, in-progress chunks get half the budget: one chunk, then the short input.
    assert work(second) == [(1, 50, 50), (3, 0, 40)]
    s.complete(second)
    assert work(s.schedule())[:2] == [(2, 50, 50), (1, 100, 50)]


def test_key_cache_budget_holds_new_long_inputs_back_but_not_short_ones():
    s = chunked(tokens=100, chunk=25, kv=300)
    s.add(1, entries(1, 200))
    s.add(2, entries(2, 200))  # 200 + 200 > 300: must wait for request 1's cache
    s.add(3, entries(3, 10))
    step = s.schedule()
    assert work(step) == [(1, 0, 25), (3, 0, 10)]
    assert s.stats.kv_tokens == 200
    s.complete(step)
    while (step := s.schedule()) is not None and all(a == 1 for a, _, _ in work(step)):
        s.complete(step)
    # Request 2 starts only in the step after request 1's last chunk completed and released its cache.
    assert work(step) == [(2, 0, 25)]
    assert s.take_released() == [(1, 0)]
    assert s.stats.kv_tokens == 200


def test_abort_releases_an_in_progress_long_input_at_once():
    s = chunked()
    s.add(1, entries(1, 200, 5))
    step = s.schedule()
    assert work(step) == [(1, 0, 25), (1, 0, 5)]
    s.complete(step)
    assert s.stats.kv_tokens == 200 and s.stats.running_inputs == 1
    assert s.abort(1) == 1
    assert s.take_released() == [(1, 0)]
    assert s.stats.kv_tokens == 0 and s.stats.running_inputs == 0
    assert s.schedule() is None


def test_abort_while_a_chunk_runs_releases_when_it_returns():
    s = chunked()
    s.add(1, entries(1, 200))
    step = s.schedule()
    s.abort(1)
    assert s.take_released() == []  # the chunk is on the device now
    assert s.complete(step) == []
    assert s.take_released() == [(1, 0)]
    assert s.stats.kv_tokens == 0 and s.schedule() is None


def test_finished_long_input_reports_its_request():
    s = chunked(chunk=50)
    s.add(1, entries(1, 120, 3))
    finished = []
    while (step := s.schedule()) is not None:
        finished += s.complete(step)
    assert finished == [1]
    assert s.stats.kv_tokens == 0 and s.stats.running_inputs == 0


# -- token budgets from the flags ----------------------------------------------------------------------------


def budgets(device: str = "cpu", max_length: int = 512, can_chunk: bool = False, **flags) -> Budgets:
    return resolve_budgets(SchedulerConfig(**flags), device_type=device, max_length=max_length, can_chunk=can_chunk)


def test_default_step_budget_is_sized_for_the_device():
    assert budgets("cpu") == Budgets(4096, None, None)
    assert budgets("cuda") == Budgets(16384, None, None)
    assert budgets("cuda", max_batch_tokens=1000) == Budgets(1000, None, None)


def test_a_causal_model_chunks_by_default_with_a_key_cache_that_holds_the_longest_input():
    assert budgets("cpu", can_chunk=True) == Budgets(4096, 512, 16384)  # 1/8 of a step; 4 steps of keys
    assert budgets("cuda", max_length=131072, can_chunk=True) == Budgets(16384, 2048, 131072)
    assert budgets(can_chunk=True, chunk_tokens=100, max_kv_tokens=600) == Budgets(4096, 100, 600)
    assert budgets(can_chunk=True, max_batch_tokens=4) == Budgets(4, 1, 512)  # never a zero chunk


def test_chunk_tokens_zero_runs_a_causal_model_in_one_pass():
    assert budgets(can_chunk=True, chunk_tokens=0) == Budgets(4096, None, None)
    # and then the step must hold the longest input, as for a bidirectional model
    with pytest.raises(ConfigError, match="--max-batch-tokens to at least 8192"):
        budgets(max_length=8192, can_chunk=True, chunk_tokens=0)


def test_budgets_that_could_never_run_the_longest_input_name_the_flag():
    with pytest.raises(ConfigError, match=r"attends both ways.*--max-batch-tokens to at least 512"):
        budgets(max_batch_tokens=256)
    with pytest.raises(ConfigError, match="--max-kv-tokens to at least 32768"):
        budgets(max_length=32768, can_chunk=True, max_kv_tokens=16384)
    assert budgets(max_batch_tokens=256, can_chunk=True).max_batch_tokens == 256  # chunks need no such step


# -- priority ---------------------------------------------------------------------------------------------------


def test_a_lower_priority_number_goes_first_and_each_level_keeps_arrival_order():
    s = Scheduler(max_batch_tokens=40, max_batch_requests=8, max_queue=1000, priority_share=0)
    s.add(1, entries(1, 10, 10, 10, 10, 10, 10), priority=100, now=0.0)  # a bulk request, queued first
    s.add(2, entries(2, 10), priority=0, now=0.01)  # a query, a moment later
    s.add(3, entries(3, 10), priority=0, now=0.02)
    assert s.stats.waiting_by_priority == {100: 6, 0: 2}
    assert ids(s.schedule()) == [(2, 0), (3, 0), (1, 0), (1, 1)]  # the queries, then the bulk fills the rest
    s.add(4, entries(4, 10), priority=0, now=0.03)
    assert ids(s.schedule()) == [(4, 0), (1, 2), (1, 3), (1, 4)]
    assert ids(s.schedule()) == [(1, 5)]
    assert s.stats.waiting_by_priority == {} and not s.has_waiting()


def queries_forever(s: Scheduler, steps: int) -> list[list[tuple[int, int]]]:
    """A priority-0 query of a full step arrives before every step; what each step runs."""
    out = []
    for i in range(steps):
        s.add(100 + i, entries(100 + i, 10), priority=0, now=1.0 + i)
        out.append(ids(s.schedule()))
    return out


def test_the_share_lets_the_oldest_input_through_a_stream_of_higher_priority_work():
    s = Scheduler(max_batch_tokens=10, max_batch_requests=8, max_queue=100, priority_share=0.25)
    s.add(1, entries(1, 10), priority=100, now=0.0)  # bulk, older than every query; each query fills a step
    # The share earns 2.5 tokens a step: on the fourth step the bulk input has earned its 10 and goes first.
    runs = queries_forever(s, 8)
    assert runs[:4] == [[(100, 0)], [(101, 0)], [(102, 0)], [(1, 0)]]
    assert runs[4:] == [[(103, 0)], [(104, 0)], [(105, 0)], [(106, 0)]]  # the query it held back, then the rest


def test_without_a_share_a_stream_of_higher_priority_work_starves_the_rest():
    s = Scheduler(max_batch_tokens=10, max_batch_requests=8, max_queue=100, priority_share=0)
    s.add(1, entries(1, 10), priority=100, now=0.0)
    assert queries_forever(s, 20) == [[(100 + i, 0)] for i in range(20)]
    assert s.stats.waiting_by_priority == {100: 1}


def test_a_short_query_still_goes_beside_the_shares_input():
    s = Scheduler(max_batch_tokens=20, max_batch_requests=8, max_queue=100, priority_share=1.0)
    s.add(1, entries(1, 10), priority=100, now=0.0)
    s.add(2, entries(2, 15), priority=100, now=0.5)
    s.add(3, entries(3, 10), priority=0, now=1.0)
    assert ids(s.schedule()) == [(1, 0), (3, 0)]  # the oldest by the share, the query, no room for the other bulk
    assert ids(s.schedule()) == [(2, 0)]


def test_abort_takes_a_request_out_of_its_level():
    s = make(tokens=10)
    s.add(1, entries(1, 10, 10), priority=7, now=0.0)
    s.add(2, entries(2, 10), priority=3, now=0.0)
    assert s.abort(1) == 2
    assert s.stats.waiting_by_priority == {3: 1} and s.stats.waiting_inputs == 1
    assert ids(s.schedule()) == [(2, 0)] and s.schedule() is None


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_the_share_is_a_fraction_of_a_step(share):
    with pytest.raises(ConfigError, match="share"):
        Scheduler(max_batch_tokens=10, max_batch_requests=8, max_queue=100, priority_share=share)
