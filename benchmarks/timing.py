"""Median wall time of a callable after one warm-up call: the one timing rule every benchmark here uses."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def cpu_line() -> str:
    """The same line in every benchmark's output, so that figures from different hosts can be told apart: the CPU
    model and the capabilities that decide CPU speed (AVX2, AVX-512, AVX512-BF16, AMX, VNNI), torch's threads."""
    import torch

    from embedserve.engine.cpu import read_cpu

    return f"cpu: {read_cpu().describe()}; torch {torch.__version__}"
