"""An int8 GEMM's input levels in one compiled pass.

Before an int8 GEMM each row of activations becomes levels: its range, a scale, a division, a rounding, a cast.
Eager torch runs each step as a pass over the whole tensor (five to seven of them), where the GEMM itself is one
read of int8 bytes; on a CPU with a fast int8 GEMM they cost about as much as the GEMM. Here that is one
function per kind of levels which ``torch.compile`` (inductor's C++ backend, every size symbolic) turns into one
loop nest: a read for the rows' ranges, a read for the levels. (The other side, the sums back to float32, stays
eager: it is already one pass in place, and a compiled one writes a new tensor.)

It needs a C++ compiler in the running process, so :func:`fusion_problem` builds the passes once on a trial and
checks them against their eager selves; :class:`kernels.linear.Int8Linear` uses them only where it answered
None, and its eager passes everywhere else. The arithmetic is the eager passes', step for step, so the levels
come out identical.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import torch

log = logging.getLogger(__name__)


def signed_levels(x: torch.Tensor, smooth: torch.Tensor, dtype: torch.dtype):
    """Levels of ``x * smooth`` at one symmetric scale per row (-127..127) as ``dtype``: int8, or uint8 shifted
    by 128 (what oneDNN's GEMM takes); and the row scales ``[T, 1]``."""
    x = x * smooth
    row = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg()).clamp(min=1e-12) / 127.0
    return ((x / row).round() + (128.0 if dtype == torch.uint8 else 0.0)).to(dtype), row


def unsigned_levels(x: torch.Tensor, smooth: torch.Tensor, steps: float):
    """Levels of ``x * smooth`` from each row's minimum (level 0, or below zero: then zero's level) in ``steps``
    steps, as uint8; the row scales and the zero points' levels ``[T, 1]``. (Computed less 128 and added back, as
    the eager passes do, so that the two round alike.)"""
    x = x * smooth
    lo = x.amin(dim=1, keepdim=True).clamp(max=0.0)
    row = (x.amax(dim=1, keepdim=True).clamp(min=0.0) - lo).clamp(min=1e-12) / steps
    zero = (lo / row).neg().round()
    return ((x / row + (zero - 128.0)).round() + 128.0).to(torch.uint8), row, zero


PASSES = (signed_levels, unsigned_levels)
compiled: dict[str, Callable] = {}  # name -> its compiled twin, filled by fusion_problem() when it answers None


@functools.cache
def fusion_problem(levels: torch.dtype) -> str | None:
    """None where inductor builds every pass here and each gives its eager self's levels on a trial; else why
    not. ``levels``: the signed levels' dtype the GEMM takes (uint8,
    shifted by 128, for oneDNN's). The first call compiles (seconds; inductor keeps what it built on disk, so a
    later start is quicker) and logs the time."""
    try:
        import torch._inductor.config as inductor

        inductor.compile_threads = 1  # no pool of compile processes beside a server for two small kernels
        started = time.perf_counter()
        built = {f.__name__: torch.compile(f, dynamic=True) for f in PASSES}
        problem = _trial(built, levels)
    except Exception as e:  # no C++ compiler, an unwritable cache folder, an inductor that cannot lower a pass
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"inductor could not build the fused int8 passes ({type(e).__name__}: {first[:200]})"
    if problem is None:
        compiled.update(built)
        log.info("int8: activation levels in one pass compiled by inductor (C++), built and checked in %.1fs",
                 time.perf_counter() - started)
    return problem


def _trial(built: dict[str, Callable], levels: torch.dtype) -> str | None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=gen) * torch.linspace(0.1, 20.0, 48)
    x[:, 3] = x[:, 3].abs()  # a row range that does not straddle zero in one channel at least
    smooth = torch.rand(48, generator=gen) + 0.5
    for name, args in (("signed_levels", (x, smooth, levels)),
                       ("unsigned_levels", (x.abs() - 1.0, smooth, 254.0))):
        for got, want in zip(built[name](*args), globals()[name](*args)):
            if not torch.equal(got, want):
                return f"inductor's {name} differs from the eager pass on a trial"
    return None
