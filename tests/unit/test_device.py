"""Device resolution at start-up: a GPU asked for and not there is an error that names the cause; auto says why
it serves on the CPU. torch's CUDA queries are replaced to play a CUDA build on a host without a GPU."""

from __future__ import annotations

import pytest
import torch

from embedserve.engine.device import resolve_device, resolve_dtype
from embedserve.errors import ConfigError


@pytest.fixture
def cuda_build_without_gpu(monkeypatch):
    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
                           "and installed a driver from http://www.nvidia.com/Download/index.aspx")

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", no_driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


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


def test_other_names_are_refused():
    for name in ("gpu", "mps", "cuda:x"):
        with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
