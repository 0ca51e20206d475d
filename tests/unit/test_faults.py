"""Which failures of a forward pass are fatal to the process, which are out-of-memory, which are ordinary."""

from __future__ import annotations

import pytest
import torch

from embedserve.engine.faults import classify, injected, run_in_parts


def test_cuda_errors_that_poison_the_context_are_fatal():
    for message in (
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
        "CUDA error: unspecified launch failure",
        "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, m, n, k, ...)`",
        "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    ):
        assert classify(RuntimeError(message)) == "fatal", message
    if hasattr(torch, "AcceleratorError"):
        assert classify(torch.AcceleratorError("CUDA error: misaligned address")) == "fatal"


def test_out_of_memory_in_any_of_its_spellings():
    assert classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert classify(RuntimeError("CUDA error: out of memory")) == "oom"
    assert classify(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")) == "oom"


def test_a_refused_cpu_allocation_is_out_of_memory():
    """The real error of torch's CPU allocator under an address-space limit (ulimit -v), in a child process."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from embedserve.engine.faults import classify\n"
        "size = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.RLIM_INFINITY))\n"
        "try:\n"
        "    torch.empty(1 << 30).fill_(1)\n"  # 4 GiB
        "except Exception as e:\n"
        "    print(type(e).__name__, classify(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["RuntimeError", "oom"], out.stdout + out.stderr


def test_everything_else_is_an_ordinary_failure():
    for exc in (RuntimeError("shape '[3, 4]' is invalid for input of size 10"), ValueError("x"),
                IndexError("index out of range in self"), KeyError("k")):
        assert classify(exc) == "error"


def test_the_fault_hook_raises_what_the_real_fault_would():
    assert [classify(injected(k)) for k in ("error", "fatal", "oom")] == ["error", "fatal", "oom"]
    assert isinstance(injected("oom"), torch.OutOfMemoryError)


# -- a step that ran out of memory, run again in parts ------------------------------------------------------


class Device:
    """Runs parts of at most ``capacity`` items; an item in ``too_big`` runs out of memory whatever it is with;
    an item in ``broken`` raises an ordinary error."""

    def __init__(self, capacity: int, too_big=(), broken=()):
        self.capacity, self.too_big, self.broken = capacity, set(too_big), set(broken)
        self.calls, self.frees = [], 0

    def run(self, indices):
        self.calls.append(list(indices))
        if len(indices) > self.capacity or self.too_big & set(indices):
            raise torch.OutOfMemoryError("CUDA out of memory")
        if self.broken & set(indices):
            raise ValueError("a bug")
        return [f"row {i}" for i in indices]

    def parts(self, count, group=lambda i: i):
        return run_in_parts(count, self.run, group=group, kind=classify, after_oom=self.free)

    def free(self):
        self.frees += 1


def test_a_step_that_fits_runs_once():
    device = Device(capacity=8)
    assert device.parts(5) == ({i: f"row {i}" for i in range(5)}, [])
    assert device.calls == [[0, 1, 2, 3, 4]] and device.frees == 0


def test_parts_halve_until_they_fit_and_every_item_is_answered():
    device = Device(capacity=2)
    rows, failures = device.parts(7)
    assert rows == {i: f"row {i}" for i in range(7)} and failures == []
    assert device.calls == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2], [0], [1, 2], [3, 4, 5, 6], [3, 4], [5, 6]]
    assert device.frees == 3  # before each split


def test_only_an_item_too_big_alone_fails_and_its_requests_other_items_are_skipped():
    device = Device(capacity=8, too_big={2})
    rows, failures = device.parts(6, group=lambda i: i // 2 if i < 4 else 9)  # requests: {0,1} {2,3} {4,5}
    (failure,) = failures
    assert failure.indices == [2] and failure.alone_oom and classify(failure.error) == "oom"
    assert sorted(rows) == [0, 1, 4, 5]  # item 3 shares item 2's request: never run again
    assert all(3 not in call for call in device.calls[1:])


def test_an_ordinary_error_fails_its_part_whole_without_more_splits():
    device = Device(capacity=2, broken={4})
    rows, failures = device.parts(6)
    assert [(f.indices, f.alone_oom, type(f.error)) for f in failures] == [([4, 5], False, ValueError)]
    assert sorted(rows) == [0, 1, 2, 3] and device.calls[-1] == [4, 5]


def test_a_fatal_fault_while_splitting_stops_everything():
    def kind(exc):
        raise RuntimeError("fatal: the engine stops")

    with pytest.raises(RuntimeError, match="fatal"):
        run_in_parts(4, Device(capacity=1).run, group=lambda i: i, kind=kind, after_oom=lambda: None)
