"""Two models' engines on one device taking turns (DeviceTurns): each answers exactly as when served alone, and
while both have work their steps alternate."""

from __future__ import annotations

import asyncio

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
    turns = DeviceTurns(on_grant=lambda name, waited: grants.append(name))
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
    # From the turn before the later model's first step (its request may finish tokenizing a little later) to
    # the earlier model's last one, both had work: no model took two turns in a row.
    start = max(grants.index(n) for n in engines) - 1
    end = min(len(grants) - 1 - grants[::-1].index(n) for n in engines) + 1
    both_busy = grants[start : end + 1]
    assert len(both_busy) >= 12 and all(a != b for a, b in zip(both_busy, both_busy[1:])), grants
