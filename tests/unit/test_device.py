"""Device resolution at start-up: a GPU asked for and not there is an error that names the cause; auto says why
it serves on the CPU. torch's CUDA queries are replaced to play a CUDA build on a host without a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from embedserve.engine.device import resolve_device, resolve_dtype
from embedserve.errors import ConfigError


def cuda_build_that_says(monkeypatch, why: str) -> None:
    """A CUDA 13.0 build of torch that sees no GPU, and ``why`` in torch's words."""
    def init():
        raise RuntimeError(why)

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def cuda_build_without_gpu(monkeypatch):
    cuda_build_that_says(monkeypatch, "Found no NVIDIA driver on your system. Please check that you have an NVIDIA "
                         "GPU and installed a driver from http://www.nvidia.com/Download/index.aspx")


def test_cuda_without_a_visible_gpu_fails_naming_the_driver_and_gpus_flag(cuda_build_without_gpu):
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(ConfigError) as err:
            resolve_device(name)
        msg = err.value.message
        assert f"--device {name}: no GPU is visible (Found no NVIDIA driver" in msg
        assert "--gpus all" in msg and "nvidia.com/gpu" in msg


def test_cuda_visible_devices_is_named_when_set(cuda_build_without_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=''"):
        resolve_device("cuda")


def test_auto_on_a_cuda_build_without_a_gpu_serves_on_cpu_and_says_why(cuda_build_without_gpu, caplog):
    caplog.set_level("WARNING")
    assert resolve_device("auto") == torch.device("cpu")
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "CUDA 13.0 build but sees no GPU (Found no NVIDIA driver" in record.getMessage()
    assert "--gpus all" in record.getMessage()


def test_auto_on_a_cpu_build_is_quiet(monkeypatch, caplog):
    caplog.set_level("WARNING")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert not caplog.records


def test_cuda_on_a_cpu_only_torch_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match="CPU-only build"):
        resolve_device("cuda")


def test_a_gpu_index_past_the_visible_ones_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"only 2 GPU\(s\) are visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_other_names_are_refused(monkeypatch):
    from embedserve.engine import device

    monkeypatch.setattr(device, "gpu_words", lambda d: ("NVIDIA H100", (9, 0)))
    for name in ("gpu", "mps", "cuda:x"):
        with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16


# --- the CPU's capabilities and the dtype --------------------------------------------------------------------

CPUS = {
    "avx2 only (Zen 3)": ("avx2 fma f16c", torch.float32),
    "avx-512, no bf16 (Skylake-SP)": ("avx2 avx512f avx512bw avx512_vnni", torch.float32),
    "avx-512 with bf16 (Zen 4)": ("avx2 avx512f avx512_vnni avx512_bf16", torch.bfloat16),
    "amx (Sapphire Rapids)": ("avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8", torch.bfloat16),
    "unknown (no /proc/cpuinfo flags)": ("", torch.float32),
}


def fake_cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                    f"model name\t: ignored\nflags\t\t: ignored\n")
    return path


@pytest.mark.parametrize("name", list(CPUS))
def test_auto_dtype_on_each_capability_set(tmp_path, monkeypatch, name):
    from embedserve.engine import cpu

    flags, want = CPUS[name]
    info = cpu.read_cpu.__wrapped__(str(fake_cpuinfo(tmp_path, flags)))
    assert info.model == "Test CPU 9000" and info.flags == frozenset(flags.split())
    monkeypatch.setattr(cpu, "read_cpu", lambda: info)
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    from embedserve.engine import device

    monkeypatch.setattr(device, "gpu_words", lambda d: ("NVIDIA H100", (9, 0)))
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # CUDA is not the CPU's business
    described = info.describe()
    assert described.startswith("Test CPU 9000") and "AVX2 " in described and "AMX " in described


def test_an_emulated_half_precision_warns_with_what_a_probe_measured(monkeypatch):
    from embedserve.engine import cpu

    monkeypatch.setattr(cpu, "matmul_gflops", lambda dtype: 1.5 if dtype != torch.float32 else 120.0)
    zen3 = cpu.CpuInfo("AMD EPYC 7B13", frozenset({"avx2"}))
    zen4 = cpu.CpuInfo("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
    warning = cpu.emulation_warning(torch.bfloat16, zen3)
    assert "--dtype bfloat16: this CPU (AMD EPYC 7B13) has no AVX512-BF16 or AMX" in warning
    assert "1.5 GFLOP/s against 120.0 in float32 (80x slower)" in warning and "(float32 here)" in warning
    assert cpu.emulation_warning(torch.bfloat16, zen4) is None  # native
    assert "AVX512-FP16" in cpu.emulation_warning(torch.float16, zen4)  # bf16 native, fp16 not
    assert cpu.emulation_warning(torch.float32, zen3) is None


def test_the_probe_divides_the_flops_it_ran_by_the_time_they_took(monkeypatch):
    # A clock the test controls (each reading 4 ms after the last), not the host's: a loaded CI machine once ran
    # this probe at 0.04 GFLOP/s, under the 0.1 that an assertion on real time asked for.
    from embedserve.engine import cpu

    readings = iter(i * 0.004 for i in range(100))
    monkeypatch.setattr(cpu, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    # start at 0; after matmuls 1, 2, 3 the clock reads 4, 8, 12 ms: three 64-square matmuls in 12 ms
    assert cpu.matmul_gflops(torch.float32, n=64, seconds=0.01) == pytest.approx(2 * 64**3 * 3 / 0.012 / 1e9)


def test_the_dtype_follows_the_gpu_generation():
    """--dtype auto is bfloat16 from Ampere on, float16 on Turing and Volta; bfloat16 asked there is refused,
    naming the GPU and what to use (issue 25)."""
    from embedserve.engine.device import cuda_dtype
    from embedserve.errors import ConfigError

    assert cuda_dtype("auto", (7, 5), "Tesla T4") == torch.float16
    assert cuda_dtype("auto", (7, 0), "Tesla V100") == torch.float16
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0)):
        assert cuda_dtype("auto", capability, "gpu") == torch.bfloat16
        assert cuda_dtype("bfloat16", capability, "gpu") == torch.bfloat16
    assert cuda_dtype("float32", (7, 5), "Tesla T4") == torch.float32
    assert cuda_dtype("float16", (7, 5), "Tesla T4") == torch.float16
    with pytest.raises(ConfigError, match=r"this GPU \(Tesla T4, sm_75\) has no bfloat16 kernels.*float16"):
        cuda_dtype("bfloat16", (7, 5), "Tesla T4")


def test_a_driver_too_old_for_the_image_names_both_cuda_versions_and_the_other_image(monkeypatch):
    cuda_build_that_says(monkeypatch, "The NVIDIA driver on your system is too old (found version 12020). Please "
                         "update your GPU driver by downloading and installing a new version from the URL: ...")
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    msg = err.value.message
    assert "supports CUDA 12.2, older than the CUDA 13.0 this torch is built for" in msg
    assert "580" in msg and "--build-arg CUDA=12.6" in msg
    from embedserve.engine.device import driver_advice

    assert "update the driver" in driver_advice("The NVIDIA driver on your system is too old (found version 12020)",
                                                "12.6")
    assert driver_advice("Found no NVIDIA driver on your system", "13.0") is None
