"""A fixed, seeded, mixed-length corpus shared by the benchmarks.

A third short queries (3-12 words), a third ~100-token passages, a sixth 256+ token documents (cut to the
model maximum), the rest a spread in between: the shape of a retrieval workload.
"""

from __future__ import annotations

import random

_WORDS = (
    "the of and to in is for on that with as by this are from at be or an it which was not have has can "
    "embedding vector search retrieval dense sparse index passage document query model server batch token "
    "latency throughput memory kernel attention layer network training inference language semantic "
    "similarity cosine neighbour cluster database storage request response client cache graph"
).split()


def mixed_corpus(n: int = 600, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 6
        if kind in (0, 1):
            k = rng.randint(3, 12)
        elif kind in (2, 3):
            k = rng.randint(70, 95)
        elif kind == 4:
            k = rng.randint(220, 400)
        else:
            k = rng.randint(15, 60)
        words = [rng.choice(_WORDS) for _ in range(k)]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
    rng.shuffle(out)
    return out
