"""What a failed forward pass means for the process, and the test hook that fakes each kind.

- ``oom``: the step did not fit in device memory (on the CPU: an allocation was refused). Nothing is broken:
  the engine splits the step and retries, and refuses only an input that does not fit on its own.
- ``fatal``: a CUDA error other than out-of-memory (an illegal address, a device-side assert, a lost
  device). It poisons the CUDA context: every later call fails too, so the engine stops, answers what it
  holds, and the process exits for Docker or Kubernetes to restart it.
- ``error``: anything else (a bug, a bad input that slipped through): that step's requests fail with 500
  and the server goes on. If such a fault stops an engine's thread itself (:class:`EngineCrash` fakes it), that
  model's engine is done but the device is not: with several models, only that one fails.

``--fault-marker TEXT --fault-kind KIND`` makes any pass that holds an input equal to TEXT fail as KIND
would, so that each path can be tested on a CPU with a real server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence, TypeVar

import torch

R = TypeVar("R")

# Words of the CUDA runtime, cuBLAS and cuDNN in the messages torch raises for device errors.
_FATAL_WORDS = (
    "CUDA error",
    "CUDA driver error",
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "unspecified launch failure",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
)
# The CPU allocator's words when an allocation is refused (an address-space or container limit): as on CUDA,
# nothing is broken, the step only did not fit.
_OOM_WORDS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
              "DefaultCPUAllocator: can't allocate memory")


def classify(exc: BaseException) -> str:
    """``oom``, ``fatal`` or ``error`` for an exception raised by a forward pass."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom"
    message = str(exc)
    if isinstance(exc, RuntimeError) and any(w in message for w in _OOM_WORDS):
        return "oom"  # cuBLAS/cuDNN workspace allocations fail with their own words
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return "fatal"
    if isinstance(exc, RuntimeError) and any(w in message for w in _FATAL_WORDS):
        return "fatal"
    return "error"


@dataclass(frozen=True)
class PartFailure:
    """A part of a split step that failed: one input that does not fit in memory alone, or a part that failed
    otherwise (every input in it)."""

    indices: list[int]
    error: BaseException
    alone_oom: bool


def run_in_parts(count: int, run: Callable[[list[int]], Sequence[R]], *, group: Callable[[int], Hashable],
                 kind: Callable[[BaseException], str], after_oom: Callable[[], None]
                 ) -> tuple[dict[int, R], list[PartFailure]]:
    """Run a step's items ``0 .. count-1`` again after the step ran out of memory: all at once, then halves (and
    their halves) while a part runs out of memory, so that only an item that does not fit on its own fails.

    ``run(indices)`` returns one result per index or raises; ``kind(exc)`` says what a raised fault is
    (:func:`classify`: it may itself raise, for a fatal one); ``after_oom()`` runs before each retry (cached memory
    handed back). ``group(i)``: the request item i belongs to: once a request failed, its items still to run are
    skipped. Returns the results by index and the failures, in the order they happened."""
    results: dict[int, R] = {}
    failures: list[PartFailure] = []
    failed_groups: set[Hashable] = set()

    def part(indices: list[int]) -> None:
        indices = [i for i in indices if group(i) not in failed_groups]
        if not indices:
            return
        try:
            out = run(indices)
        except Exception as exc:
            oom = kind(exc) == "oom"
            if oom and len(indices) > 1:
                after_oom()
                half = len(indices) // 2
                part(indices[:half])
                part(indices[half:])
                return
            failures.append(PartFailure(indices, exc, alone_oom=oom))
            failed_groups.update(group(i) for i in indices)
            return
        results.update(zip(indices, out))

    part(list(range(count)))
    return results, failures


class EngineCrash(BaseException):
    """A bug that stops the engine thread (it is not an Exception, so no step's handler takes it for a failed
    step): the test hook for an engine that dies while the device is fine."""


def injected(kind: str) -> BaseException:
    """The exception a pass holding the fault marker raises: the same type and words as the real fault."""
    if kind == "oom":
        return torch.OutOfMemoryError("CUDA out of memory (injected by --fault-marker)")
    if kind == "fatal":
        return RuntimeError("CUDA error: an illegal memory access was encountered (injected by --fault-marker)")
    if kind == "crash":
        return EngineCrash("the engine thread crashed (injected by --fault-marker)")
    return RuntimeError("fault injected by --fault-marker")
