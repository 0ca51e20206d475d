"""The fused linear kernel against its pure-torch twin (and fp64 for accuracy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedserve.kernels.linear import ACTIVATIONS, linear, select_linear_backend

CPU = torch.device("cpu")


def backends(dtype):
    return sorted({"torch", select_linear_backend(CPU, dtype)})


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 7, 3), (37, 384, 1000), (300, 50, 36)])
def test_fp32_matches_fp64_reference(act, shape):
    T, n_in, n_out = shape
    torch.manual_seed(0)
    x, w, b = torch.randn(T, n_in), torch.randn(n_out, n_in) / n_in**0.5, torch.randn(n_out)
    want = linear(x.double(), w.double(), b.double(), act, backend="torch")
    for backend in backends(torch.float32):
        got = linear(x, w, b, act, backend=backend)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backends_agree(dtype):
    torch.manual_seed(1)
    x, w, b = torch.randn(64, 96), torch.randn(80, 96) / 10, torch.randn(80)
    want = F.gelu(F.linear(x, w, b))
    for backend in backends(dtype):
        got = linear(x.to(dtype), w.to(dtype), b.to(dtype), "gelu", backend=backend)
        assert got.dtype == dtype
        assert F.cosine_similarity(got.float().flatten(), want.flatten(), dim=0) > 0.999


def test_no_bias():
    x, w = torch.randn(4, 5), torch.randn(3, 5)
    for backend in backends(torch.float32):
        torch.testing.assert_close(linear(x, w, None, backend=backend), x @ w.T)


def test_choice_is_logged(caplog):
    caplog.set_level("INFO")
    choice = select_linear_backend(CPU, torch.float32)
    assert f"linear backend: {choice}" in caplog.text
    assert select_linear_backend(torch.device("cuda"), torch.float16) == "torch"


def test_a_server_of_ever_changing_row_counts_keeps_bounded_onednn_caches():
    """Packed steps give the fused linear a new row count nearly every time; oneDNN (and torch's ideep layer)
    cache one primitive per shape. In a fresh process (the caches are sized at first use), 315 row counts twice
    over grow the process by about 236 MB with the default 1024-entry caches and about 97 MB with the 128 this
    package sets; the bound is checked at 150 MB, and a second pass over the same shapes must not grow it."""
    import subprocess
    import sys

    code = (
        "import ctypes, re, torch\n"
        "from embedserve.kernels.linear import linear, select_linear_backend\n"
        "assert select_linear_backend(torch.device('cpu'), torch.float32) == 'onednn'\n"
        "trim = ctypes.CDLL('libc.so.6').malloc_trim\n"
        "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "w, b = torch.randn(1536, 384), torch.randn(1536)\n"
        "trim(0); start = rss()\n"
        "for p in range(2):\n"
        "    for m in range(1, 4096, 13):\n"
        "        linear(torch.randn(m, 384), w, b, 'gelu', 'onednn')\n"
        "    trim(0); print(rss() - start)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    first, second = (int(x) for x in out.stdout.split())
    assert first < 150, f"the fused linear's caches grew the process by {first} MB"
    assert second - first < 20
