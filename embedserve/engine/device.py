"""The compute device: resolved once at start-up with errors an operator can act on, then bound per thread.

``--device cuda`` (the CUDA image sets it) on a host whose GPU is not visible stops the server at start-up,
naming the likely cause (no driver, a container started without ``--gpus``), rather than serving on the
CPU at a fraction of the speed. ``--device auto`` falls back to the CPU, but says why when the torch is a
CUDA build. Every thread that launches work on a GPU other than ``cuda:0`` must make it the current device
(Triton and some torch kernels launch on the current device, not the tensors'): :func:`bind_thread`.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from embedserve.engine import cpu
from embedserve.errors import ConfigError
from embedserve.models.sentence import DTYPES

log = logging.getLogger(__name__)


def _why_no_gpu() -> str:
    """The reason torch gives for seeing no GPU (CUDA build only)."""
    try:
        torch.cuda.init()
    except Exception as e:  # torch raises RuntimeError / AssertionError with the driver's words
        return str(e).strip().splitlines()[0]
    return "torch.cuda.is_available() is false"


def driver_advice(why: str, torch_cuda: str | None) -> str | None:
    """What to do when torch says the driver is too old for its CUDA (None: that is not what it says)."""
    import re

    m = re.search(r"driver on your system is too old \(found version (\d+)\)", why)
    if m is None:
        return None
    found = int(m.group(1))
    other = ("run the image built with --build-arg CUDA=12.6 (drivers 560 or newer, R535/R550 on datacenter GPUs)"
             if torch_cuda and not torch_cuda.startswith("12.") else "update the driver")
    return (f"the host's NVIDIA driver supports CUDA {found // 1000}.{found % 1000 // 10}, older than the CUDA "
            f"{torch_cuda} this torch is built for: update the driver (CUDA 13.0 needs 580 or newer), or {other}")


def _no_gpu_help() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = (
        "Is the NVIDIA driver installed on the host (nvidia-smi works there), and was the container started "
        "with --gpus all (Docker) or given an nvidia.com/gpu resource (Kubernetes)?"
    )
    if visible is not None:
        hint += f" CUDA_VISIBLE_DEVICES={visible!r} limits what this process sees."
    return hint


def names_the_cpu(name: str) -> bool:
    """Whether ``name`` (as :func:`resolve_device` takes it) resolves to the CPU; nothing is logged or checked."""
    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a concrete device (``cuda`` becomes ``cuda:0``)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.version.cuda is not None:
            why = _why_no_gpu()
            log.warning(
                "device auto: this torch is a CUDA %s build but sees no GPU (%s); serving on the CPU, much "
                "slower. %s Set --device cuda to make a missing GPU an error.",
                torch.version.cuda, why, driver_advice(why, torch.version.cuda) or _no_gpu_help(),
            )
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from e
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if torch.version.cuda is None:
        raise ConfigError(
            f"--device {name}: this torch ({torch.__version__}) is a CPU-only build. Install a CUDA build of "
            "torch (the CUDA image has one), or serve with --device cpu."
        )
    if not torch.cuda.is_available():
        why = _why_no_gpu()
        advice = driver_advice(why, torch.version.cuda)
        if advice is not None:
            raise ConfigError(f"--device {name}: {advice}.")
        raise ConfigError(f"--device {name}: no GPU is visible ({why}). {_no_gpu_help()}")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ConfigError(f"--device {name}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1}).")
    return torch.device("cuda", index)


BF16_MIN_CAPABILITY = (8, 0)  # bfloat16 kernels (and FlashAttention-2): Ampere or newer


def cuda_dtype(name: str, capability: tuple[int, int], gpu: str) -> torch.dtype:
    """``--dtype`` on a GPU of ``capability``: ``auto`` is bfloat16 from Ampere (sm_80) on, float16 before
    (Turing's T4, Volta's V100); an explicit bfloat16 below sm_80 is refused, naming the GPU and what to use."""
    native_bf16 = capability >= BF16_MIN_CAPABILITY
    if name == "auto":
        return torch.bfloat16 if native_bf16 else torch.float16
    if name == "bfloat16" and not native_bf16:
        raise ConfigError(f"--dtype bfloat16: this GPU ({gpu}, sm_{capability[0]}{capability[1]}) has no bfloat16 "
                          "kernels (they need sm_80, Ampere, or newer); serve float16 (--dtype auto picks it here) "
                          "or float32")
    return DTYPES[name]


def gpu_words(device: torch.device) -> tuple[str, tuple[int, int]]:
    """(the GPU's name, its compute capability)."""
    return torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)


def driver_version() -> str:
    """The NVIDIA driver's CUDA version, as the driver reports it ("unknown" where torch cannot say)."""
    try:
        v = int(torch._C._cuda_getDriverVersion())
    except Exception:  # noqa: BLE001 - a private call: absent or failing means unknown, never a start-up error
        return "unknown"
    return f"{v // 1000}.{v % 1000 // 10}"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: on CUDA bfloat16 from Ampere on, else float16 (:func:`cuda_dtype`); on the CPU bfloat16 where
    it computes it natively (AVX512-BF16 or AMX), else float32."""
    if device.type == "cuda":
        gpu, capability = gpu_words(device)
        return cuda_dtype(name, capability, gpu)
    if name == "auto":
        return cpu.auto_cpu_dtype(cpu.read_cpu())
    return DTYPES[name]


def bind_thread(device: torch.device) -> None:
    """Make ``device`` the calling thread's current CUDA device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back after an out-of-memory, before retrying smaller."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _cpu_limit() -> tuple[int, str] | None:
    """The tightest memory limit this process runs under, in bytes, and what sets it."""
    import resource

    found = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path, encoding="ascii").read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            found.append((int(raw), "the container's limit"))
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        found.append((soft, "the address-space limit (ulimit -v)"))
    return min(found) if found else None


def memory_words(device: torch.device) -> str:
    """What the process holds at its peak so far and what it may hold, for the start-up log."""
    mib = 1 << 20
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_allocated(device)
        return f"{device}: peak {peak // mib} MiB allocated, {free // mib} of {total // mib} MiB free"
    try:
        status = open("/proc/self/status", encoding="ascii").read()
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return "cpu: peak unknown"
    limit = _cpu_limit()
    return f"cpu: peak resident {peak // mib} MiB" + (f"; limit {limit[0] // mib} MiB, {limit[1]}" if limit else "")


@functools.lru_cache(maxsize=None)
def _libc(name: str):
    """A glibc call from the process's own symbols (looked up once, on first use); None elsewhere."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_HEAP_BLOCKS = 1 << 30


def keep_blocks_on_the_heap() -> bool:
    """Serve the step-sized blocks a CPU forward pass allocates and frees from the heap, not from fresh mappings.

    glibc maps blocks above a threshold (a few MB at most) with mmap and unmaps them on free: every such tensor
    then costs a system call and a page fault per 4 KB touched, and its free a TLB shootdown. The int8 layers
    make several step-sized temporaries each: this took int8 MiniLM from ~8,100 to ~12,400 tokens/s on the
    2-core development host (float32, one fused GEMM per layer, moved little). Blocks up to 1 GiB come from the
    heap instead and stay there between steps; :func:`release_host_memory` hands the free ones back when idle.
    Threads started from now on share the main heap (one arena): a thread's own arena is made of 64 MB
    mappings that glibc unmaps whenever one empties, the same churn again; the engine thread's int8 steps ran
    ~25% slower there than on the main thread. False where the C library has no mallopt."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    return all(mallopt(option, value) for option, value in (
        (_M_MMAP_THRESHOLD, _HEAP_BLOCKS), (_M_TRIM_THRESHOLD, _HEAP_BLOCKS), (_M_ARENA_MAX, 1)))


def release_host_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim). Packed steps of ever-changing shapes
    leave the CPU allocator's arenas fragmented: without this an idle CPU server keeps hundreds of MB (measured:
    a 2 GB process back to 0.5 GB) it no longer uses. False where the C library has no such call."""
    trim = _libc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True
