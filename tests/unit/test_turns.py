"""DeviceTurns: one step at a time on the device, granted in the order asked, so busy models alternate."""

from __future__ import annotations

import threading
import time

from embedserve.engine.turns import DeviceTurns


def test_turns_never_overlap_and_a_flooding_model_cannot_starve_another():
    grants: list[str] = []
    turns = DeviceTurns(on_grant=lambda name, waited: grants.append(name))
    inside: list[str] = []
    overlap = []

    def step(name: str) -> None:
        with turns.turn(name):
            inside.append(name)
            if len(inside) > 1:
                overlap.append(tuple(inside))
            time.sleep(0.002)  # a forward pass
            inside.remove(name)

    stop = threading.Event()

    def flood() -> None:  # model A always has work, and asks again the moment its step ends
        while not stop.is_set():
            step("A")

    a_turns_while_b_waited: list[int] = []

    def single_requests() -> None:  # model B: single short requests while A floods
        for _ in range(20):
            asked = len(grants)
            step("B")
            granted = len(grants) - 1 - grants[::-1].index("B")
            a_turns_while_b_waited.append(grants[asked:granted].count("A"))
            time.sleep(0.003)

    a = threading.Thread(target=flood, daemon=True)
    a.start()
    deadline = time.monotonic() + 30
    while grants.count("A") < 3:  # A is flooding before B asks at all
        assert time.monotonic() < deadline, "A never got the device"
        time.sleep(0.001)
    b = threading.Thread(target=single_requests, daemon=True)
    b.start()
    b.join(60)  # bounded: a starved B would otherwise wait as long as A floods
    stop.set()
    a.join(10)
    assert not b.is_alive(), f"B starved: {len(a_turns_while_b_waited)} of 20 steps in 60 s"
    assert not overlap
    assert grants.count("B") == 20
    # B waits for at most the one A step already queued when it asked: A's next request queues behind B. (A plain
    # lock lets the flooding thread take it back again and again.)
    assert max(a_turns_while_b_waited) <= 1, a_turns_while_b_waited
    assert grants.count("A") > 20  # A really was flooding all along


def test_a_turn_is_released_when_its_step_raises():
    turns = DeviceTurns()
    try:
        with turns.turn("A"):
            raise RuntimeError("a failed forward pass")
    except RuntimeError:
        pass
    done = threading.Event()
    t = threading.Thread(target=lambda: (turns.turn("B").__enter__(), done.set()))
    t.start()
    t.join(5)
    assert done.is_set()
