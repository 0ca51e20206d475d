"""Two models' engines on one device taking turns (DeviceTurns): each answers exactly as when served alone, and
while both have work their steps alternate."""

from __future__ import annotations

import asyncio
import time

import torch

from embedserve.config import EngineConfig, SchedulerConfig
from embedserve.engine.front import Engine
from embedserve.engine.turns import DeviceTurns
from on_device import model_config
from tiny import MINILM_DIR, build_tiny_encoder, embed_with, mixed_texts


def test_two_engines_share_the_device_in_turns_and_answer_as_alone(tmp_path):
    build_tiny_encoder(tmp_path, "xlm-roberta", seed=2)
    texts = mixed_texts(48, seed=4)
    alone = {"minilm": embed_with(MINILM_DIR, texts), "tiny": embed_with(tmp_path, texts)}
    grants: list[str] = []
    timed_out: list[str] = []  # turns whose wait for the other model ran out (none should)

    def on_grant(name: str, waited: float) -> None:
        # Hold each turn until the other model waits for the device too (or has had all its 12 steps): the
        # FIFO rule, not the threads' timing, then decides who goes next.
        grants.append(name)
        other = "tiny" if name == "minilm" else "minilm"
        deadline = time.monotonic() + 60
        while not turns._waiting and grants.count(other) < 12:
            if time.monotonic() > deadline:
                timed_out.append(name)
                break
            time.sleep(0.001)

    turns = DeviceTurns(on_grant=on_grant)
    small_steps = SchedulerConfig(max_batch_requests=4)  # many steps each, so that they must interleave
    engines = {
        "minilm": Engine(EngineConfig(model=model_config(MINILM_DIR), scheduler=small_steps), turns=turns,
                         name="minilm"),
        "tiny": Engine(EngineConfig(model=model_config(tmp_path), scheduler=small_steps), turns=turns, name="tiny"),
    }
    for e in engines.values():
        e.start()

    async def both():
        names = list(engines)
        results = await asyncio.gather(*(engines[n].embed(texts) for n in names))  # both queued at once
        return {n: r.vectors for n, r in zip(names, results)}

    try:
        got = asyncio.run(both())
    finally:
        for e in engines.values():
            e.shutdown()
    for name in engines:
        assert (got[name] - alone[name]).abs().max() <= 1e-5, name
    assert grants.count("minilm") == grants.count("tiny") == 12  # 48 inputs, 4 per step
    assert not timed_out
    # While both wait for the device, neither takes two turns in a row: the two strictly alternate.
    assert all(a != b for a, b in zip(grants, grants[1:])), grants
