"""What this CPU computes natively, read once from /proc/cpuinfo, and what that means for the dtype.

The CPUs a CPU image lands on differ: AVX-512 hosts with native bf16 (AVX512-BF16, or AMX) run bf16 matmuls
about 2.5x faster than fp32, while AVX2-only hosts emulate bf16 and run it ~100x slower. ``--dtype auto`` picks
bf16 only where it is native; an explicit half precision on a CPU that emulates it starts with a warning that
says so and what a short probe measured.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def bf16(self) -> bool:
        """bf16 dot products in hardware: AVX512-BF16 or AMX-BF16."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def fp16(self) -> bool:
        return bool({"avx512_fp16", "amx_fp16"} & self.flags)

    @property
    def amx(self) -> bool:
        return bool({"amx_bf16", "amx_int8", "amx_tile"} & self.flags)

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    def describe(self) -> str:
        caps = {"AVX2": self.avx2, "AVX-512": self.avx512, "AVX512-BF16": "avx512_bf16" in self.flags,
                "AMX": self.amx, "VNNI": self.vnni}
        have = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in caps.items())
        return f"{self.model}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads: {have}"


@functools.lru_cache(maxsize=1)
def read_cpu(path: str = "/proc/cpuinfo") -> CpuInfo:
    """The first processor's model name and flags (Linux); unknown elsewhere (no capabilities assumed)."""
    model, flags = "unknown CPU", frozenset()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
    except OSError:
        pass
    return CpuInfo(model, flags)


def auto_cpu_dtype(info: CpuInfo) -> torch.dtype:
    """``--dtype auto`` on the CPU: bf16 where the CPU computes it natively, float32 (exact) elsewhere."""
    return torch.bfloat16 if info.bf16 else torch.float32


def matmul_gflops(dtype: torch.dtype, n: int = 256, seconds: float = 0.05) -> float:
    """A short probe: ``n``-square matmuls in ``dtype`` for about ``seconds``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # first call: kernel selection
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed / 1e9


def emulation_warning(dtype: torch.dtype, info: CpuInfo) -> str | None:
    """The start-up warning for a half precision this CPU emulates (None when it is native, or for float32)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and info.bf16) or (dtype == torch.float16 and info.fp16):
        return None
    name = str(dtype).removeprefix("torch.")
    half, full = matmul_gflops(dtype), matmul_gflops(torch.float32)
    hardware = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AVX512-FP16 or AMX-FP16"
    return (f"--dtype {name}: this CPU ({info.model}) has no {hardware}, so {name} is emulated: a probe ran "
            f"{name} matmuls at {half:.1f} GFLOP/s against {full:.1f} in float32 ({full / max(half, 1e-9):.0f}x "
            f"slower). Serving will be that much slower; --dtype auto "
            f"({str(auto_cpu_dtype(info)).removeprefix('torch.')} here) is faster.")
