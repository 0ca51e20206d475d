"""Which failures of a forward pass are fatal to the process, which are out-of-memory, which are ordinary."""

from __future__ import annotations

import torch

from embedserve.engine.faults import classify, injected


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
